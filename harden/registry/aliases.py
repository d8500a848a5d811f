"""The serving alias: which blessed version holds it, and how concurrent promoters agree on it.

Only a version tagged ``hardening.status=blessed`` whose registered evidence shows the blessing
(:func:`~harden.registry.manifest.blessing_problem`) may hold the serving alias.

Concurrent promotions (rule): **the highest blessed version number holds the alias.** Version numbers are
assigned by the registry in creation order, so this is "the newest blessed hardening wins", whatever order
the alias writes land in. MLflow has no compare-and-set on aliases, so every promoter converges instead
(:func:`claim_alias`): it reads the blessed versions and the alias holder, points the alias at the highest
blessed version when the two differ, and repeats until a read after its last write agrees. Because a version
is tagged ``blessed`` before it touches the alias and the set of blessed versions only grows, the last writer's
check sees every contender, so the alias ends on the highest blessed version. Every lower blessed version is
then tagged ``hardening.superseded_by=<winner>`` (the loser of a race, and the previous champion), so no
blessed version is silently lost. To roll back, set the bad version's ``hardening.status`` to ``revoked``
(it then no longer counts as blessed) and move the alias by hand.

A registration that fails is cleaned up here too (:func:`mark_failed`: the version tagged ``failed``, the alias
taken off it), and one that was interrupted is swept by the next (:func:`sweep_pending`).
"""

from __future__ import annotations

import logging
import random
import time

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from harden.errors import RegistryError
from harden.registry.client import Client, Deadline, bounded_http, check_store_exists, is_not_found, wait_reachable
from harden.registry.manifest import blessing_problem
from harden.registry.tags import REASONS_TAG, STATUS_TAG, SUPERSEDED_TAG

logger = logging.getLogger(__name__)

#: Bound on read/write rounds while concurrent promoters converge on one alias holder.
CLAIM_ROUNDS = 20
#: Failed alias writes tolerated while claiming (concurrent first writes of an alias collide in MLflow's store).
ALIAS_WRITE_ATTEMPTS = 3
#: A version left ``pending`` longer than this by an interrupted promote is tagged failed by the next one.
PENDING_STALE_S = 3600.0


def move_alias(name: str, version: int, alias: str, *, tracking_uri: str) -> int:
    """Promote ``version`` of ``name`` (tagged ``hardening.status=blessed``) to ``alias``.

    Follows the rule of the module docstring: when a higher blessed version exists, it keeps (or receives) the
    alias and ``version`` is tagged ``hardening.superseded_by``.

    Returns:
        The version the alias points at afterwards (``version`` unless it was superseded).

    Raises:
        RegistryError: the version does not exist, is not blessed, the sqlite database is missing, or the
            registry is unreachable.
    """
    check_store_exists(tracking_uri)
    wait_reachable(tracking_uri)
    client = Deadline.on(tracking_uri, f"moving @{alias} of {name!r}")
    try:
        with bounded_http():
            mv = client.get_model_version(name, str(version))
            status = mv.tags.get(STATUS_TAG)
            if status != "blessed":
                raise RegistryError(f"refusing to move @{alias} to {name} version {version}: its {STATUS_TAG} is "
                                    f"{status!r}, not 'blessed'")
            winner = claim_alias(client, name, alias, int(version))
    except MlflowException as err:
        raise RegistryError(f"moving @{alias} of {name!r} to version {version} failed: {err}") from err
    if winner == int(version):
        logger.info("@%s of %s -> version %s", alias, name, version)
    else:
        logger.warning("@%s of %s stays on version %s: version %s is superseded by it", alias, name, winner, version)
    return winner


def _blessed_versions(client: Client, name: str, verified: dict[str, str | None] | None = None) -> list[ModelVersion]:
    """Every version of ``name`` tagged ``hardening.status=blessed`` whose registered evidence shows the blessing
    (:func:`blessing_problem`; results cached in ``verified`` by version). Others are logged and left out."""
    verified = {} if verified is None else verified
    found: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name='{name}'", page_token=token)
        for mv in page:
            if mv.tags.get(STATUS_TAG) != "blessed":
                continue
            key = str(mv.version)
            if key not in verified:
                verified[key] = blessing_problem(client, mv)
                if verified[key]:
                    logger.warning("%s version %s is tagged blessed but does not count: %s", name, key, verified[key])
            if verified[key] is None:
                found.append(mv)
        token = page.token
        if not token:
            return found


def _alias_holder(client: Client, name: str, alias: str) -> int | None:
    """The version ``alias`` points at, None when it is not set."""
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if is_not_found(err):
            return None
        raise


def claim_alias(client: Client, name: str, alias: str, version: int) -> int:
    """Converge ``alias`` on the highest blessed version, tag every lower blessed one superseded; return the winner.

    ``version`` must already be tagged blessed. Each round reads the blessed versions and the alias holder
    and, when they disagree, points the alias at the highest blessed version; it stops when a read after the
    last write agrees (see the module docstring for why concurrent promoters end in the same state). A failed
    alias write is retried from a fresh read, up to :data:`ALIAS_WRITE_ATTEMPTS` times.

    Raises:
        RegistryError: ``version`` is no longer blessed, or no agreement after :data:`CLAIM_ROUNDS` rounds.
        MlflowException: a registry call failed.
    """
    write_errors: list[MlflowException] = []
    verified: dict[str, str | None] = {}
    for _ in range(CLAIM_ROUNDS):
        blessed = _blessed_versions(client, name, verified)
        if version not in {int(mv.version) for mv in blessed}:
            why = verified.get(str(version)) or f"it is not tagged {STATUS_TAG}=blessed"
            raise RegistryError(f"{name} version {version} cannot hold @{alias}: {why}; not promoting it")
        best = max(int(mv.version) for mv in blessed)
        if _alias_holder(client, name, alias) == best:
            break
        try:
            client.set_registered_model_alias(name, alias, str(best))
        except MlflowException as err:
            # Two first-time writes of an alias collide in MLflow's store (UNIQUE constraint on the alias row);
            # the next round reads what the other writer left. A write that keeps failing is raised.
            write_errors.append(err)
            if len(write_errors) >= ALIAS_WRITE_ATTEMPTS:
                raise
            logger.warning("writing @%s of %s failed (%s); reading it again", alias, name, err)
            time.sleep(random.uniform(0.05, 0.3))
    else:
        raise RegistryError(f"@{alias} of {name!r} did not settle after {CLAIM_ROUNDS} rounds of concurrent promotion")
    for mv in blessed:
        if int(mv.version) < best and SUPERSEDED_TAG not in mv.tags:
            _tag_superseded(client, name, mv.version, best)
    return best


def _tag_superseded(client: Client, name: str, version: str, winner: int) -> None:
    """Tag ``version`` superseded by ``winner``; a concurrent promoter writing the same tag first is fine.

    Raises:
        MlflowException: the write failed and the tag is still absent.
    """
    try:
        client.set_model_version_tag(name, version, SUPERSEDED_TAG, str(winner))
    except MlflowException:  # two first writes of one tag collide in MLflow's store (UNIQUE constraint)
        if SUPERSEDED_TAG not in client.get_model_version(name, version).tags:
            raise


def _release_alias(client: Client, name: str, alias: str, version: str) -> None:
    """If ``alias`` points at the (now failed) ``version``, move it to the highest blessed version, or drop it."""
    if _alias_holder(client, name, alias) != int(version):
        return
    others = [int(mv.version) for mv in _blessed_versions(client, name) if mv.version != version]
    if others:
        client.set_registered_model_alias(name, alias, str(max(others)))
        logger.warning("@%s of %s moved back from failed version %s to version %s", alias, name, version, max(others))
    else:
        client.delete_registered_model_alias(name, alias)
        logger.warning("@%s of %s removed from failed version %s (no other blessed version)", alias, name, version)


def mark_failed(client: Client, name: str, version: str | None, run_id: str | None, err: Exception,
                 alias: str | None) -> bool:
    """Best effort: tag the version failed and the run FAILED, and, when ``alias`` may have been written, take
    it off the failed version. Returns whether the version's tag and the alias are confirmed (a second failure
    is logged, not raised)."""
    confirmed = True
    try:
        if version is not None:
            client.set_model_version_tag(name, version, STATUS_TAG, "failed")
            client.set_model_version_tag(name, version, REASONS_TAG, f"registration failed: {err}"[:5000])
        if run_id is not None:
            client.set_terminated(run_id, status="FAILED")
    except (MlflowException, RegistryError, OSError) as second:
        logger.error("could not mark %s version %s as failed: %s", name, version, second)
        confirmed = version is None
    if version is not None and alias is not None:
        try:
            _release_alias(client, name, alias, version)
        except (MlflowException, RegistryError, OSError) as second:
            logger.error("could not check @%s of %s after version %s failed: %s", alias, name, version, second)
            # an alias name the registry refuses cannot point anywhere; anything else leaves it unknown
            confirmed = confirmed and getattr(second, "error_code", None) == "INVALID_PARAMETER_VALUE"
    return confirmed


def sweep_pending(client: Client, name: str) -> list[str]:
    """Tag ``failed`` every version of ``name`` still ``pending`` (our tag, or MLflow's ``PENDING_REGISTRATION``
    without a verdict) after :data:`PENDING_STALE_S`: an interrupted promote's leftover (a concurrent promote's
    fresh pending version is younger). Returns their numbers."""
    try:
        found = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        if is_not_found(err):
            return []
        raise
    now_ms = time.time() * 1000
    stale = [mv.version for mv in found
             if (mv.tags.get(STATUS_TAG) == "pending" or mv.status == "PENDING_REGISTRATION")
             and mv.tags.get(STATUS_TAG) not in ("blessed", "rejected", "failed")
             and now_ms - (mv.creation_timestamp or 0) > PENDING_STALE_S * 1000]
    for number in stale:
        client.set_model_version_tag(name, number, STATUS_TAG, "failed")
        client.set_model_version_tag(name, number, REASONS_TAG,
                                     f"left pending by an interrupted promote (older than {PENDING_STALE_S:.0f} s)")
        logger.warning("%s version %s was left pending by an interrupted promote; tagged failed", name, number)
    return stale
