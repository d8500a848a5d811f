"""How the stages are run end to end: the Kubeflow Pipelines v2 pipeline (:mod:`pipeline.harden_pipeline`: build,
compile, run locally) and the ``nft-harden`` command line (:mod:`pipeline.cli`).

Nothing is imported here, so the CLI's quick commands (``check-params``) do not pay for importing kfp."""
