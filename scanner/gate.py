"""The promotion gate: scan a requested model version, record the verdict on it, and promote it
only when it is clean. Also the watcher's two jobs: finding requests that wait for a scan, and
the guard that undoes a hand-moved target alias or stage.

This is registry logic without Prefect: the flows in `flows/` call these functions and turn
the `Reporter` calls into Prefect artifacts. Every failure ends with status `error` on the
version, and nothing here promotes a version whose status is not `clean`.

Idempotency (product.md): a scan is identified by (model sha256, settings hash). A version
already decided with the current settings is not scanned again; a version whose bytes were
scanned before (as another version, or by a flow that died after logging) reuses that scan run.
Two flows for the same version are kept apart by a claim taken under the caller's lock: the
first sets status `running` with its claim id, the second sees it and leaves. Two versions with
the same bytes scanned at once are kept apart by the caller's scan lock on (sha256, settings).
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from scanner.errors import TrojanScanError
from scanner.loading_common import _one_line
from scanner.policy import ModelPolicy, Policy
from scanner.registry import (CA_DROP, CA_DROP_BOUND, ERROR, FLAGGED, GUARD, PATCHED_FROM, PROMOTED_AT, REQUESTED_BY,
                              SCAN_RUN_ID, SCANNED_AT, SETTINGS_HASH, SHA256, STATUS, UNLEARN_RUN_ID, VERDICT, Registry,
                              RegistryUnavailable, VersionInfo, utc_now)

CLAIM = "trojanscan.claim"
ClaimLock = Callable[[str, str], contextlib.AbstractContextManager[Any]]  # (name, version)
ScanLock = Callable[[str, str, float], contextlib.AbstractContextManager[Any]]  # (sha256, settings hash, timeout s)
TRANSIENT_RETRIES = 3  # an unreachable registry: tries before the version ends `error`
TRANSIENT_PAUSE_SECONDS = 5.0  # pause before retry n is n times this


class Reporter(Protocol):
    """Where a gate run reports to (Prefect artifacts in a flow, the console in the CLI)."""

    def progress(self, fraction: float, text: str) -> None: ...

    def scanned(self, outcome: GateOutcome, result: dict[str, Any], run_url: str | None) -> None: ...

    def note(self, title: str, markdown: str) -> None: ...


class SilentReporter:
    def progress(self, fraction: float, text: str) -> None:
        pass

    def scanned(self, outcome: GateOutcome, result: dict[str, Any], run_url: str | None) -> None:
        pass

    def note(self, title: str, markdown: str) -> None:
        pass


@dataclass
class GateOutcome:
    """What happened to one request."""

    name: str
    version: str
    status: str  # clean | infected | error | running (another run holds it) | skipped
    verdict: str | None = None
    flagged_classes: list[int] = field(default_factory=list)
    scan_run_id: str | None = None
    promoted: bool = False
    scanned: bool = False  # False when an earlier scan of the same bytes and settings was reused
    unlearn: bool = False  # the policy wants the unlearning flow started for this version
    reasons: list[str] = field(default_factory=list)
    result_dir: str | None = None
    seconds: float = 0.0
    detector_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Request:
    """A version that waits for a scan, and why."""

    name: str
    version: str
    reason: str


# -- requests ---------------------------------------------------------------------------------
def is_requested(info: VersionInfo, policy: ModelPolicy) -> bool:
    """Does the version hold the policy's request place (or is it a patched version)?"""
    if PATCHED_FROM in info.tags:
        return True
    request = policy.request
    if request.on_register:
        return True
    if request.alias is not None:
        return request.alias in info.aliases
    return info.stage == request.stage


def holds_target(info: VersionInfo, policy: ModelPolicy) -> bool:
    target = policy.target
    return target.alias in info.aliases if target.alias is not None else info.stage == target.stage


def _age_seconds(timestamp: str | None) -> float:
    if not timestamp:
        return float("inf")
    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(timestamp)).total_seconds()
    except ValueError:
        return float("inf")


def needs_scan(info: VersionInfo, policy: ModelPolicy) -> bool:
    """Not yet decided under the current settings, and not held by a live claim."""
    status = info.status
    if status in ("clean", "infected") and info.tags.get(SETTINGS_HASH) == policy.settings_hash():
        return False
    if status == "error":
        return False  # terminal until the version is requested again (a new event or a re-tag)
    if status == "running":
        return is_stale_claim(info, policy)
    return True


def is_stale_claim(info: VersionInfo, policy: ModelPolicy) -> bool:
    """A `running` claim older than any live scan can be: its flow died (a killed worker, a
    registry outage that outlasted the flow's retries). The request it holds is still owed."""
    return info.status == "running" and \
        _age_seconds(info.tags.get(SCANNED_AT)) > policy.max_scan_seconds + policy.stale_claim_seconds


def pending_requests(registry: Registry, policy: Policy) -> list[Request]:
    """Every version that waits for a scan (the watcher's poll): those holding their request
    place, and those whose claim went stale even if the request place has moved on since (the
    request was accepted once, so it is still owed a verdict)."""
    found = []
    for name in registry.registered_models():
        if not policy.covers(name):
            continue
        model_policy = policy.for_model(name)
        for info in registry.versions(name):
            if is_stale_claim(info, model_policy):
                found.append(Request(name, info.version, "stale claim (its flow died)"))
            elif is_requested(info, model_policy) and needs_scan(info, model_policy):
                found.append(Request(name, info.version, f"{model_policy.request.describe()} (poll)"))
    return found


# -- what a registry event asks for ------------------------------------------------------------
def event_action(event: str, alias: str | None, policy: Policy, name: str) -> str:
    """What an event asks for: `scan`, `guard` (someone set the target alias: undo it if the
    version is not clean), `ignore` (an alias or a new version the policy does not act on), or
    `skip` (the model is not covered by the policy)."""
    if not policy.covers(name):
        return "skip"
    model_policy = policy.for_model(name)
    if event.endswith("model_version_alias.created"):
        if alias == model_policy.request.alias:
            return "scan"
        return "guard" if alias == model_policy.target.alias else "ignore"
    if event.endswith("model_version.created"):
        return "scan" if model_policy.request.on_register else "ignore"
    return "scan"  # manual, watcher, patched: the caller asks for a scan


def settled_promotion(registry: Registry, policy: Policy, event: str, name: str, version: str,
                      alias: str | None) -> str | None:
    """Why an alias event needs no flow run, or None when it does. The one case: the target
    alias set on a version that holds it now and is `clean`. That is the gate's own promotion
    (or a hand move to a clean version), which the guard would leave alone; every clean verdict
    raises one such event. Any later move of the alias raises its own event, so answering from
    the registry now loses nothing; the watcher's guard runs on its schedule as well."""
    if event_action(event, alias, policy, name) != "guard" or alias is None:
        return None
    holder = registry.alias_holder(name, alias)
    if holder is None or holder.version != str(version) or holder.status != "clean":
        return None
    return f"{name} v{version} holds @{alias} and is clean: nothing to guard"


# -- the guard --------------------------------------------------------------------------------
def guard(registry: Registry, policy: Policy, name: str) -> list[str]:
    """Undo a target alias or stage found on a version that is not `clean` (moved there by
    hand, or by anything but the gate): the alias goes back to the clean version the gate promoted
    last, or is removed; a non-clean version in the target stage is archived. Returns what was done.

    Only a version the gate itself promoted (tag `trojanscan.promoted_at`) is a fallback: `clean`
    alone also marks versions scanned by hand and patched versions the gate held back (CA drop,
    auto-promote off), and the guard must not promote what the gate refused."""
    model_policy = policy.for_model(name)
    target = model_policy.target
    if target.alias is not None:
        # one version holds an alias: when it is clean there is nothing to undo, and the gate's
        # own promotions (each one an alias event) cost one read instead of one per version
        holder = registry.alias_holder(name, target.alias)
        if holder is None or holder.status == "clean":
            return []
    versions = registry.versions(name)
    promoted = [v for v in versions if v.status == "clean" and PROMOTED_AT in v.tags]
    actions = []
    for info in versions:
        if info.status == "clean" or not holds_target(info, model_policy):
            continue
        why = f"held {target.describe()} while status was {info.status or 'unscanned'}"
        if target.alias is not None:
            fallback = max((v for v in promoted if v.version != info.version),
                           key=lambda v: (v.tags[PROMOTED_AT], int(v.version)), default=None)
            if fallback is not None:
                registry.set_alias(name, target.alias, fallback.version)
                action = f"{name} v{info.version} {why}: @{target.alias} moved back to v{fallback.version}"
            else:
                registry.delete_alias(name, target.alias)
                action = f"{name} v{info.version} {why}: @{target.alias} removed (no clean version the gate promoted)"
        else:
            registry.set_stage(name, info.version, "Archived")
            action = f"{name} v{info.version} {why}: archived"
        registry.set_tags(name, info.version, {GUARD: f"{utc_now()} {action}"})
        actions.append(action)
    return actions


# -- the scan of one version --------------------------------------------------------------------
def scan_version(
    registry: Registry,
    policy: Policy,
    name: str,
    version: str,
    workdir: str | Path,
    *,
    lock: ClaimLock = lambda name, version: contextlib.nullcontext(),
    scan_lock: ScanLock = lambda sha256, settings_hash, timeout_seconds: contextlib.nullcontext(),
    reporter: Reporter | None = None,
    requested_by: str = "manual",
    claim_id: str | None = None,
    retries: int | None = None,
) -> GateOutcome:
    """Claim, scan (or reuse a scan of the same bytes and settings), record, and gate one version.

    `lock(name, version)` serialises claims of the version across processes (a Prefect
    concurrency slot in the flows). `scan_lock(sha256, settings_hash, timeout_seconds)` is held
    from the download to the logged scan run, so two versions with the same bytes scanned at
    once give one scan: the later one waits and reuses the run. An unreachable registry is
    retried `retries` times (default TRANSIENT_RETRIES, pauses growing by TRANSIENT_PAUSE_SECONDS) with the same claim; then the
    version ends `error`. Raises
    RegistryUnavailable only when even that could not be written: the version keeps its
    `running` claim, is never promoted, and the watcher starts it again once the claim is stale."""
    reporter = reporter or SilentReporter()
    retries = TRANSIENT_RETRIES if retries is None else retries
    started = time.perf_counter()
    outcome = GateOutcome(name=name, version=str(version), status="error")
    if not policy.covers(name):
        outcome.status, outcome.reasons = "skipped", [f"{name} is not covered by the policy"]
        return outcome
    model_policy = policy.for_model(name)
    claim_id = claim_id or uuid.uuid4().hex
    for attempt in range(retries + 1):
        outcome = GateOutcome(name=name, version=str(version), status="error")
        try:
            _claim_scan_and_gate(registry, policy, model_policy, outcome, Path(workdir), lock, scan_lock, reporter,
                                 requested_by, claim_id)
        except RegistryUnavailable as error:
            if attempt < retries:  # transient (product.md): retried, never turned into a verdict
                pause = TRANSIENT_PAUSE_SECONDS * (attempt + 1)
                reporter.progress(0.0, f"{error}; retrying in {pause:g} s")
                time.sleep(pause)
                continue
            # raises RegistryUnavailable if even this cannot be written: the claim then goes stale
            _record_error(registry, outcome, f"{error} (gave up after {retries} retries)")
        except ClaimLost as lost:
            outcome.status, outcome.reasons = "running", [str(lost)]
        except TrojanScanError as error:
            _record_error(registry, outcome, str(error))
        except Exception as error:  # a bug or an unforeseen input still ends as error, never clean
            _record_error(registry, outcome, f"{type(error).__name__}: {_one_line(error)[:300]}")
        break
    outcome.seconds = time.perf_counter() - started
    return outcome


def _claim_scan_and_gate(registry: Registry, policy: Policy, model_policy: ModelPolicy, outcome: GateOutcome,
                         workdir: Path, lock: ClaimLock,
                         scan_lock: ScanLock, reporter: Reporter, requested_by: str, claim_id: str) -> None:
    name, version = outcome.name, outcome.version
    with lock(name, version):
        info = registry.get_version(name, version)
        live_claim = info.status == "running" and not needs_scan(info, model_policy)
        if live_claim and info.tags.get(CLAIM) != claim_id:
            outcome.status, outcome.reasons = "running", [f"already being scanned (claim {info.tags.get(CLAIM)})"]
            return
        decided = not needs_scan(info, model_policy) and info.status in ("clean", "infected")
        if not decided:
            registry.set_tags(name, version, {STATUS: "running", CLAIM: claim_id, SCANNED_AT: utc_now(),
                                              REQUESTED_BY: requested_by})
    if decided:
        _outcome_from_tags(outcome, info)
        outcome.reasons = [f"already scanned: {info.status} (run {info.tags.get(SCAN_RUN_ID)})"]
    else:
        _scan_and_record(registry, policy.experiment, model_policy, info, workdir, outcome, scan_lock, reporter, claim_id)
    _gate(registry, model_policy, outcome)


def _outcome_from_tags(outcome: GateOutcome, info: VersionInfo) -> None:
    outcome.status = outcome.verdict = info.status or "error"
    outcome.scan_run_id = info.tags.get(SCAN_RUN_ID)
    outcome.flagged_classes = _flagged(info)


def _flagged(info: VersionInfo) -> list[int]:
    """The classes a version's scan flagged, from its tag (none when untagged or empty)."""
    return json.loads(info.tags.get(FLAGGED, "[]") or "[]")


class ClaimLost(Exception):
    """Another flow took over this version's claim (ours was judged stale): leave it to that one."""


def _check_claim(registry: Registry, info: VersionInfo, claim_id: str) -> None:
    holder = registry.get_version(info.name, info.version).tags.get(CLAIM)
    if holder != claim_id:
        raise ClaimLost(f"claim taken over by {holder}; this run records nothing")


def _scan_and_record(registry: Registry, experiment: str, policy: ModelPolicy, info: VersionInfo, workdir: Path,
                     outcome: GateOutcome, scan_lock: ScanLock, reporter: Reporter, claim_id: str) -> None:
    from scanner.model_io import model_digest

    folder = workdir / f"{info.name}-v{info.version}-{uuid.uuid4().hex[:8]}"
    reporter.progress(0.0, f"downloading {info.uri}")
    downloaded = registry.download_model(info, folder / "model", allow_pickle=policy.allow_pickle)
    sha256 = model_digest(downloaded.model_file)
    settings_hash = policy.settings_hash()
    out_dir = folder / "scan"
    out_dir.mkdir(parents=True, exist_ok=True)
    # another version with these bytes may be scanning now: wait for it, then reuse its run
    with scan_lock(sha256, settings_hash, policy.max_scan_seconds + policy.stale_claim_seconds):
        previous = registry.find_scan_run(experiment, sha256, settings_hash)
        if previous is not None:
            result = registry.scan_result(previous, out_dir)
            run_id = previous
            outcome.reasons = [f"reused scan run {previous} of the same model bytes and settings"]
        else:
            result, run_id = _scan_and_log(registry, experiment, policy, info, folder, out_dir, downloaded.model_file,
                                           sha256, settings_hash, outcome, reporter, claim_id)
    outcome.result_dir = str(out_dir)
    outcome.verdict = result["verdict"]
    outcome.flagged_classes = list(result.get("flagged_classes", []))
    outcome.scan_run_id = run_id
    if outcome.verdict not in ("clean", "infected"):
        raise TrojanScanError(f"scan run {run_id} ended with verdict {outcome.verdict}: {result.get('reasons')}")
    outcome.status = outcome.verdict
    # tags are written one by one: the status goes last, so whoever sees it sees the rest too
    _check_claim(registry, info, claim_id)
    registry.set_tags(info.name, info.version, {
        VERDICT: outcome.verdict, FLAGGED: json.dumps(outcome.flagged_classes),
        SCAN_RUN_ID: run_id, SHA256: sha256, SCANNED_AT: utc_now(), SETTINGS_HASH: settings_hash,
        STATUS: outcome.verdict,
    })
    if ERROR in info.tags:  # an error from an earlier request
        registry.delete_tag(info.name, info.version, ERROR)
    reporter.progress(1.0, f"{outcome.verdict}")
    reporter.scanned(outcome, result, registry.run_url(run_id, experiment))


def _scan_and_log(registry: Registry, experiment: str, policy: ModelPolicy, info: VersionInfo, folder: Path,
                  out_dir: Path, model_file: Path, sha256: str, settings_hash: str, outcome: GateOutcome, reporter: Reporter,
                  claim_id: str) -> tuple[dict[str, Any], str]:
    """Scan the downloaded model, write result.json and the report into `out_dir`, log the scan
    run; returns the result and the run id."""
    from scanner.scan import scan_fraction, scan_model

    data_path, data_reference = registry.resolve_clean_data(info, policy.clean_data, folder / "data")
    reporter.progress(0.02, "scanning")
    budget = _Budget(policy.max_scan_seconds, policy.max_memory_mb)
    settings = policy.scan_settings()

    def progress(detector: str, done: int, total: int) -> None:
        budget.check()
        fraction = scan_fraction(settings.detectors, detector, done, total)
        reporter.progress(0.02 + 0.9 * fraction, f"{detector}: {done}/{total} classes")

    scan = scan_model(model_file, data_path, settings, out_dir=out_dir,
                      allow_pickle=policy.allow_pickle, normalization=policy.normalization,
                      progress=progress, model_reference=info.uri)
    budget.check()
    scan.data["reference"] = data_reference
    scan.extra["registry"] = {"name": info.name, "version": info.version, "source": info.source,
                              "run_id": info.run_id, "tracking_uri": registry.tracking_uri,
                              "settings_hash": settings_hash}
    if UNLEARN_RUN_ID in info.tags:  # a patched version: its report shows CA/ASR before and after
        unlearning = registry.download_run_artifact(info.tags[UNLEARN_RUN_ID], "unlearning.json", folder / "unlearn")
        scan.extra["unlearning"] = json.loads(Path(unlearning).read_text()) | {
            "patched_from": info.tags.get(PATCHED_FROM), "unlearn_run_id": info.tags[UNLEARN_RUN_ID]}
    result = scan.to_json()
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(out_dir)
    reporter.progress(0.95, "logging the scan run")
    _check_claim(registry, info, claim_id)  # a run that outlived its claim must not log a second scan
    run_id = registry.log_scan_run(experiment, result, out_dir, run_name=f"scan {info.name} v{info.version}",
                                   tags={SHA256: sha256, SETTINGS_HASH: settings_hash,
                                         "trojanscan.model": f"{info.name}/{info.version}"})
    outcome.scanned = True
    outcome.detector_seconds = float(sum(d.seconds for d in scan.detections.values()))
    outcome.reasons = list(scan.reasons)
    return result, run_id


def write_report(out_dir: Path) -> Path | None:
    """The HTML audit report beside result.json (when the report module is present)."""
    try:
        from scanner.report import write_report as render
    except ImportError:
        return None
    target = out_dir / "report.html"
    render(out_dir / "result.json", target)
    return target


def _gate(registry: Registry, policy: ModelPolicy, outcome: GateOutcome) -> None:
    """Promote a clean version that still holds its request; never anything else."""
    info = registry.get_version(outcome.name, outcome.version)  # fresh: the request may have moved
    if info.status != "clean":
        outcome.unlearn = info.status == "infected" and policy.auto_unlearn and PATCHED_FROM not in info.tags
        if info.status == "infected" and PATCHED_FROM in info.tags:
            outcome.reasons.append(_patched_flags(registry, info))
        return
    if not is_requested(info, policy):
        outcome.reasons.append(f"not promoted: v{info.version} no longer holds {policy.request.describe()}")
        return
    if PATCHED_FROM in info.tags:
        if not policy.auto_promote_patched:
            outcome.reasons.append("not promoted: a patched version, and the policy does not auto-promote those")
            return
        bounded = policy.ca_drop_check == "upper_bound"
        drop = float(info.tags.get(CA_DROP_BOUND if bounded else CA_DROP, "inf"))  # a missing tag never promotes
        if drop > policy.max_ca_drop:
            what = "CA drop's upper bound" if bounded else "CA drop"
            outcome.reasons.append(f"not promoted: the patch's {what} is {drop:.4f} (> {policy.max_ca_drop})")
            return
    if holds_target(info, policy):
        return  # already promoted (a repeated event): never promote twice
    target = policy.target
    if target.alias is not None:
        registry.set_alias(info.name, target.alias, info.version)
    else:
        registry.set_stage(info.name, info.version, target.stage or "Production")
    registry.set_tags(info.name, info.version, {PROMOTED_AT: utc_now()})
    outcome.promoted = True
    outcome.reasons.append(f"promoted to {target.describe()}")


def _patched_flags(registry: Registry, info: VersionInfo) -> str:
    """What an infected rescan of a patched version flags against what its source was flagged
    on: new classes on a patched model have been natural features more often than triggers
    (benchmarks/results/HISTORY.md, "Rescans of patched versions"), which a reader should know."""
    source = registry.get_version(info.name, info.tags[PATCHED_FROM])
    before, after = _flagged(source), _flagged(info)
    still, new = sorted(set(before) & set(after)), sorted(set(after) - set(before))
    return (f"not promoted, not patched again: patched from v{source.version} (flagged {before}); this scan flags "
            f"{after}: {still or 'none'} still, {new or 'none'} new (a new class on a patched model can be a "
            "natural feature; look at its restored trigger in the report)")


ERROR_TAG_PATIENCE_SECONDS = 60.0  # how long a scan waits for a vanished registry to take its `error`


def _record_error(registry: Registry, outcome: GateOutcome, reason: str) -> None:
    """Status `error` with its reason. When the registry is down, keep trying for a minute (a
    restarted server gets the error); after that raise RegistryUnavailable. The version is then
    left `running`, never promoted, and the watcher takes it up again once that claim is stale."""
    outcome.status, outcome.promoted = "error", False
    outcome.reasons.append(reason)
    deadline = time.monotonic() + ERROR_TAG_PATIENCE_SECONDS
    pause = 1.0
    while True:
        try:
            registry.set_tags(outcome.name, outcome.version, {ERROR: reason[:500], SCANNED_AT: utc_now(), STATUS: "error"})
            return
        except RegistryUnavailable:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 1.5, 5.0)
        except TrojanScanError:
            return  # the version itself is gone: nothing to tag, nothing to promote


class _Budget:
    """Time and memory limits of one scan (the policy's); exceeding one ends the scan as error.

    Memory is the process's peak resident size during this scan: on Linux the peak is reset at
    the start (`/proc/self/clear_refs`), so an earlier, larger scan in the same long-lived
    process (the demo, a watcher running scans inline) does not count against this one.
    Elsewhere the peak since the process started is used, which can only err towards `error`."""

    def __init__(self, seconds: float, memory_mb: float | None) -> None:
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.memory_mb = memory_mb
        if memory_mb is not None:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current size

    @staticmethod
    def peak_mb() -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise TrojanScanError(f"scan budget exceeded: more than {self.seconds:g} s")
        if self.memory_mb is not None:
            peak_mb = self.peak_mb()
            if peak_mb > self.memory_mb:
                raise TrojanScanError(f"scan budget exceeded: peak memory {peak_mb:.0f} MB > {self.memory_mb:g} MB")
