"""Phase one's plan: what a cache made with a `PrecomputeConfig` will be, and what to do with its `--out`.

Pure: no engine is loaded. From the config, the data and the model's and tokenizer's fingerprints it builds the
run metadata every part will carry (the backend's entry as the backend says it will score: `Backend.numerics`)
and so the cache identity (`prefpipe.data.identity`), then scans an existing output directory once: which parts
are this run's and sound (a resume keeps them), which come from another run (precompute refuses them, the
pipeline recomputes), and whether a finished cache can be reused as it is. `prefpipe precompute` and the pipeline
both plan through here, so they build one identity and make one decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefpipe import __version__
from prefpipe.data import identity, kto_pairs
from prefpipe.data.cache import MANIFEST, part_is_sound, read_manifest, read_part_metadata
from prefpipe.data.fingerprint import model_fingerprint, tokenizer_fingerprint
from prefpipe.data.identity import SCHEMA_VERSION
from prefpipe.errors import UserError
from prefpipe.fileio import is_lock_file
from prefpipe.model_paths import resolve_model_dir
from prefpipe.precompute.backend import BackendOptions, backend_class
from prefpipe.precompute.config import PrecomputeConfig
from prefpipe.tokenizer import load_tokenizer
from prefpipe.wording import plural


def fingerprints(model: str, tokenizer=None) -> dict:
    """{"model": the weights fingerprint, "tokenizer": the tokenizer's fingerprint entry}; computed once per
    process and handed to every plan (the weights are hashed once, see prefpipe.data.fingerprint)."""
    if tokenizer is None:
        tokenizer = load_tokenizer(str(resolve_model_dir(model)))
    return {"model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer)}


def kind_of(cfg: PrecomputeConfig, ds) -> str:
    return "unpaired" if (cfg.kto or not ds.paired) else "paired"


def planned_backend(cfg: PrecomputeConfig, options: BackendOptions | None = None) -> dict:
    """The metadata's `backend` entry as far as the identity reads it (name, dtype, quantization), from the
    backend's own rule; the engine's full provenance replaces it once loaded."""
    if cfg.no_reference:
        return {"name": "none"}
    dtype, quantization = backend_class(cfg.backend).numerics(options or cfg.backend_options)
    return {"name": cfg.backend, "dtype": dtype, **({"quantization": quantization} if quantization else {})}


def run_metadata(cfg: PrecomputeConfig, ds, fps: dict, backend: dict) -> dict:
    """The metadata every part of this run carries (less `created_at` and `part`)."""
    kind = kind_of(cfg, ds)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "prefpipe_version": __version__,
        "kind": kind,
        "has_reference": not cfg.no_reference,
        "per_token": bool(cfg.per_token),
        "model": {"path": str(cfg.model), "fingerprint": fps["model"]},
        "tokenizer": fps["tokenizer"],
        "tokenization": cfg.input.tokenize_settings().metadata(),
        "data": {"path": str(cfg.data), "fingerprint": ds.fingerprint(), "format": ds.format,
                 "columns": asdict(cfg.input.columns), "turn_marker": cfg.input.turn_marker},
        "backend": backend,
        "layout": {"part_rows": cfg.part_rows},
    }
    if kind == "unpaired":
        meta["kto"] = {"source": "paired" if ds.paired else "unpaired",
                       "example_ids": "row_id:chosen / row_id:rejected" if ds.paired else "row_id",
                       "partner_rule": kto_pairs.RULE,
                       "kl_completion": "partner's completion cut from the right to max_length - len(prompt_ids)"}
    return meta


@dataclass
class PartScan:
    """The part files of an output directory, against one run's identity."""
    files: int = 0  # part files found
    ours: int = 0  # readable parts of this run, sound or not
    done: dict[int, dict] = field(default_factory=dict)  # this run's sound parts: index -> their `part` entry
    foreign: list[tuple[Path, list[str]]] = field(default_factory=list)  # another run's parts, and what differs

    def refuse(self):
        """Precompute's answer to a part of another run: stop, naming the first such file."""
        if self.foreign:
            f, diff = self.foreign[0]
            raise UserError(f"--out already holds a cache part from a different run ({'; '.join(diff[:6])}); use "
                            "another --out, or --overwrite to replace it", file=str(f))


def scan_parts(out: Path, expected: dict) -> PartScan:
    """Every `part-*.parquet` in `out`: a part whose resume identity (`identity.RESUME_KEYS`) differs is foreign;
    an unreadable part, or one that fails `part_is_sound`, is neither (its owner scores it again)."""
    scan = PartScan()
    for f in sorted(Path(out).glob("part-*.parquet")):
        scan.files += 1
        try:
            index = int(f.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        meta = read_part_metadata(f)
        if meta is None or "part" not in meta:
            continue
        diff = identity.differences(expected, identity.identity_of(meta), resume=True)
        if diff:
            scan.foreign.append((f, diff))
            continue
        scan.ours += 1
        if part_is_sound(f, meta):
            scan.done[index] = meta["part"]
    return scan


@dataclass
class CachePlan:
    """What phase one will write (`metadata`, `expected`: its identity) and what it finds at `out`: `action` is
    compute (nothing there), reuse (a finished cache of this identity), resume (an unfinished one of this run)
    or recompute (anything else, or --overwrite), with a `reason` a person reads. `parts()`: the scan of its part
    files (made when the decision needed it, else on first call: a finished cache's reuse reads only the
    manifest)."""
    out: str
    metadata: dict
    expected: dict
    action: str
    reason: str
    scan: PartScan | None

    def parts(self) -> PartScan:
        if self.scan is None:
            self.scan = scan_parts(Path(self.out), self.expected)
        return self.scan

    @property
    def key(self) -> str:
        """The digest of the identity this cache serves (the pipeline's directory names and run records)."""
        return identity.key(identity.reuse(self.expected))


def decide(out: str, expected: dict, *, overwrite: bool) -> tuple[str, str, PartScan | None]:
    """(action, reason, scan or None) for the output directory `out` of a run whose identity is `expected`."""
    d = Path(out)
    if overwrite:
        return "recompute", "--overwrite was given", PartScan()
    if not d.is_dir() or all(is_lock_file(f.name) for f in d.iterdir()):  # a lock file alone: nothing written
        return "compute", "no cache there yet", PartScan()
    if not (d / MANIFEST).exists():
        scan = scan_parts(d, expected)
        diff = sorted({x for _, found in scan.foreign for x in found})
        if scan.ours and not diff:
            return "resume", f"an unfinished cache of this run: {plural(scan.files, 'part')} done", scan
        return "recompute", "an unfinished cache from a different run" + (f" ({'; '.join(diff)})" if diff else ""), scan
    try:
        meta = read_manifest(d)["metadata"]
    except UserError as e:
        return "recompute", f"the old cache is unreadable: {e.message}", None
    diff = identity.differences(expected, identity.identity_of(meta))
    if diff:
        return "recompute", "; ".join(diff), None
    return "reuse", "model, tokenizer, tokenization and data fingerprints match", None


def expected(cfg: PrecomputeConfig, ds, fps: dict, options: BackendOptions | None = None) -> tuple[dict, dict]:
    """(the run metadata, its identity) of `cfg` reading `ds`, with the fingerprints `fps`; `options`: the
    engine options it will run with when they differ from the config's (a rank's device)."""
    meta = run_metadata(cfg, ds, fps, planned_backend(cfg, options))
    return meta, identity.identity_of(meta)


def plan(cfg: PrecomputeConfig, ds, fps: dict, options: BackendOptions | None = None, *, out=None) -> CachePlan:
    """The plan of `cfg` (see `expected`) and the decision for its output directory: `cfg.out`, or `out(key)`
    when given (the pipeline names its caches after the identity's key)."""
    meta, ident = expected(cfg, ds, fps, options)
    where = str(out(identity.key(identity.reuse(ident)))) if out is not None else str(cfg.out)
    action, reason, scan = decide(where, ident, overwrite=cfg.overwrite)
    return CachePlan(where, meta, ident, action, reason, scan)
