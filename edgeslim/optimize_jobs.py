"""Candidate evaluations of `edgeslim optimize` as independent jobs: recipe steps in, a JSON of metrics out.

A job compresses the source with a candidate's steps into an artifact (`<key>.slim`, the key being the
SHA-256 of the source and steps), exports it with its ONNX stages and evaluates it on the eval data. It
never times anything: timings are taken by the search on the target, beside the original. Jobs run in
this process, in local worker processes (`workers` > 1) or on an existing Ray cluster (`ray_address`).

Results are cached in the work folder by (artifact hash, target fingerprint, eval data hash), so a search
that was interrupted resumes: an artifact already there is loaded, not compressed again, and a result
already there is reused, not evaluated again. The work folder lies in edgeslim's cache (edgeslim/cache.py),
one per (source, target, eval data, calibration data, budget axis).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from edgeslim.core.errors import ConfigError, EdgeslimError, MissingDependencyError
from edgeslim.core.files import sha256_file
from edgeslim.trust import Trust

RESULTS = "results.json"  # in the work folder: cache key -> result
RAY_CONNECT_S = 5.0  # a Ray address that does not accept a connection within this is refused


@dataclass(frozen=True)
class Job:
    """One candidate to build and evaluate."""

    source: str
    steps: tuple[Mapping[str, Any], ...]
    profile: str
    eval: str
    folder: str  # the work folder (must be visible to the worker: this machine, a local Ray, a shared disk)
    fingerprint: str  # the target's (profile, machine or board) fingerprint
    source_options: Mapping[str, Any] = field(default_factory=dict)  # weights, inputs, task of load_model
    trust: Trust | None = None
    export: bool = True  # False (a size budget): nothing is timed, so nothing is exported (the chosen one is, at the end)

    @property
    def key(self) -> str:
        text = json.dumps([self.source, dict(self.source_options), list(self.steps)], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def data_hash(spec: str) -> str:
    """SHA-256 of the eval data: the file's (or every file's in a folder) bytes, or the data set name."""
    path = Path(spec)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        text = "".join(f"{p.relative_to(path)}:{sha256_file(p)}" for p in files)
        return hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256(f"dataset:{spec}".encode()).hexdigest()


def result_key(artifact_sha: str, fingerprint: str, eval_sha: str) -> str:
    return hashlib.sha256(f"{artifact_sha}|{fingerprint}|{eval_sha}".encode()).hexdigest()[:24]


def read_results(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / RESULTS
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def store_result(folder: str | Path, key: str, result: Mapping[str, Any]) -> None:
    """Add one result to the work folder's cache (written whole: temp file renamed in)."""
    data = read_results(folder) | {key: dict(result)}
    tmp = Path(folder) / f".{RESULTS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, Path(folder) / RESULTS)


def run_job(job: Job) -> dict[str, Any]:
    """Build (or reload) the candidate's artifact and ONNX file, and evaluate it (or reuse its cached result)."""
    from edgeslim import artifact
    from edgeslim.evaluate import evaluate
    from edgeslim.optimize_space import weight_bytes
    from edgeslim.pipeline import compress_to_artifact, export_model, has_onnx_stage
    from edgeslim.sources import load_model

    folder = Path(job.folder)
    slim, onnx = folder / f"{job.key}.slim", folder / f"{job.key}.onnx"
    options = dict(job.source_options)
    reused = (slim / artifact.MANIFEST).is_file()
    if reused:
        compressed = load_model(str(slim), trust=job.trust)
    else:
        _, compressed, _, _ = compress_to_artifact(job.source, job.steps, slim, options.get("weights"),
                                                   options.get("inputs"), True, job.profile, job.trust,
                                                   options.get("task"))
    if job.export and not onnx.is_file():
        export_model(compressed, "onnx", onnx, job.profile, quiet=True)
    artifact_sha = sha256_file(slim / artifact.MANIFEST)
    key = result_key(artifact_sha, job.fingerprint, data_hash(job.eval))
    cached = read_results(folder).get(key)
    if cached is not None and "metric" in cached:
        return dict(cached) | {"cached": True}
    reference = load_model(job.source, trust=job.trust, **options) if compressed.task == "feature-extraction" else None
    result = evaluate(compressed, job.eval, reference=reference, onnx=onnx if has_onnx_stage(compressed) else None,
                      progress=False)
    return {"key": key, "job": job.key, "slim": str(slim), "onnx": str(onnx) if onnx.is_file() else None,
            "artifact_sha256": artifact_sha,
            "metric_name": result.metric, "metric": result.value, "samples": result.samples,
            "weight_bytes": weight_bytes(compressed.model), "cached": False,
            "artifact_reused": reused}


class Runner:
    """Runs jobs: here (workers <= 1), in a local process pool, or on a Ray cluster."""

    def __init__(self, workers: int = 1, ray_address: str | None = None) -> None:
        self.workers, self.ray = workers, None
        self._pool: ProcessPoolExecutor | None = None
        if ray_address:
            self.ray = connect_ray(ray_address)
        elif workers > 1:
            import multiprocessing
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def map(self, jobs: Sequence[Job], done: Callable[[Job, dict[str, Any]], None]) -> None:
        """Run every job; `done(job, result)` is called in order as results arrive (an EdgeslimError of a job
        is its result: {"error": message})."""
        if self.ray is not None:
            remote = self.ray.remote(_safe_job)
            refs = [remote.remote(job) for job in jobs]
            for job, ref in zip(jobs, refs):
                done(job, self.ray.get(ref))
        elif self._pool is not None:
            for job, result in zip(jobs, self._pool.map(_safe_job, jobs)):
                done(job, result)
        else:
            for job in jobs:
                done(job, _safe_job(job))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _safe_job(job: Job) -> dict[str, Any]:
    from edgeslim.noise import quiet_libraries
    quiet_libraries(False)
    try:
        return run_job(job)
    except EdgeslimError as exc:
        return {"error": " ".join(str(exc).split())}


def connect_ray(address: str) -> Any:
    """The `ray` module connected to the cluster at `address` (an existing local `ray.init()` is reused).

    Raises:
        MissingDependencyError: ray is not installed.
        ConfigError: the address does not answer within RAY_CONNECT_S seconds.
    """
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("--ray needs Ray: pip install 'edgeslim[ray]'") from None
    if ray.is_initialized():
        return ray
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address not in ("auto", "local"):
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=RAY_CONNECT_S).close()
        except (OSError, ValueError):
            raise ConfigError(f"Ray address {address} does not answer (no connection within {RAY_CONNECT_S:g} s); "
                              "give the head node's HOST:PORT (ray start --head prints it)") from None
    ray.init(address=None if address == "local" else address, logging_level="ERROR", log_to_driver=False)
    return ray
