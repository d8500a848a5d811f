"""MLflow model registry adapter: pull a candidate package, register candidates and hardened versions, and move
the serving alias.

Conventions: aliases (``@candidate``, ``@champion``) and tags only, never stages; every call takes the tracking
URI explicitly, and the registry URI is the same. One module per concern:

- :mod:`~harden.registry.client`: model references, URIs, reachability, the bounds on every registry call;
- :mod:`~harden.registry.pull`: pulling a version's package with its provenance;
- :mod:`~harden.registry.register`: registering candidates and hardened versions (the status lifecycle);
- :mod:`~harden.registry.manifest`: the registered evidence and what makes a version count as blessed;
- :mod:`~harden.registry.aliases`: the rule for which blessed version holds the alias, and how concurrent
  promoters converge on it;
- :mod:`~harden.registry.tags`: the tags written on versions and runs.
"""

from harden.errors import RegistryError
from harden.registry.aliases import move_alias
from harden.registry.client import (bounded_http, check_store_exists, parse_model_ref, strip_credentials,
                                    wait_reachable)
from harden.registry.manifest import MANIFEST_FILE, PLOT_ROLE_PREFIX, blessing_problem
from harden.registry.pull import pull
from harden.registry.register import DEFAULT_EXPERIMENT, register_candidate, register_hardened
from harden.registry.tags import MANIFEST_TAG, ONNX_SHA_TAG, REASONS_TAG, STATUS_TAG, SUPERSEDED_TAG

__all__ = [
    "DEFAULT_EXPERIMENT", "MANIFEST_FILE", "MANIFEST_TAG", "ONNX_SHA_TAG", "PLOT_ROLE_PREFIX", "REASONS_TAG",
    "STATUS_TAG", "SUPERSEDED_TAG", "RegistryError", "blessing_problem", "bounded_http", "check_store_exists",
    "move_alias", "parse_model_ref", "pull", "register_candidate", "register_hardened", "strip_credentials",
    "wait_reachable",
]
