"""The hardening stage: model packages, MLflow registry, ONNX export, evaluation, gate, report, and the stage
functions shared by the CLI, the DVC stages and the Kubeflow components. Algorithms live in :mod:`nft_core`."""
