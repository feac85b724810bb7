"""
The model-zoo manifest (``model_zoo/manifest.yaml``): its schema, checked on load so that a
bad entry fails in one line naming the entry and the key, and name lookup.

Where it is read from: ``$EQLOSSES_D2_MODEL_ZOO_MANIFEST`` when set (a private mirror, the
tests' loopback server), else the copy installed inside the package
(``eqlosses_d2/model_zoo/manifest.yaml``, linked by setup.py), else ``model_zoo/`` of the
checkout the package is imported from.
"""
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

__all__ = [
    "MANIFEST_ENV",
    "PREFIX",
    "SYNTHETIC_DATA",
    "Checksum",
    "ModelZooEntry",
    "ModelZooError",
    "Weights",
    "close_matches",
    "find_entry",
    "load_manifest",
    "manifest_path",
]

MANIFEST_ENV = "EQLOSSES_D2_MODEL_ZOO_MANIFEST"
#: the path scheme of model-zoo checkpoints: ``MODEL.WEIGHTS eqlosses_d2://NAME``
PREFIX = "eqlosses_d2://"
#: the label every number measured on the embedded data carries
SYNTHETIC_DATA = "embedded synthetic data, quickstart schedule"

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENTRY_KEYS = {"name", "config", "config_package", "opts", "setting", "weights", "reported", "ours", "notes"}
_SETTING_KEYS = ("dataset", "method", "backbone", "schedule", "sampler")
_METRIC_KEYS = {"source", "data", "bbox", "segm", "cls", "sem_seg"}
_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
#: an image classifier's numbers (``cls``): top-1 / top-5 and the many- / medium- / few-shot splits
CLS_METRICS = ("top1", "top5", "many", "medium", "few")
#: the datasets whose entries are image classifiers: ``cls`` numbers, no ``bbox`` / ``segm``
CLASSIFICATION_DATASETS = ("embedded synthetic data (classification)", "ImageNet-LT", "Places-LT",
                           "iNaturalist 2018", "CIFAR-10-LT", "CIFAR-100-LT")
#: a semantic segmenter's numbers (``sem_seg``): Detectron2's SemSegEvaluator's and the mIoU of the
#: rare / common / frequent classes (by training images)
SEM_SEG_METRICS = ("mIoU", "fwIoU", "mACC", "pACC", "mIoU-r", "mIoU-c", "mIoU-f")
#: the datasets whose entries are semantic segmenters: ``sem_seg`` numbers only
SEM_SEG_DATASETS = ("embedded synthetic data (semantic segmentation)", "ADE20K")
#: each kind of numbers and its metric names
_TASK_METRICS = {"bbox": _METRICS, "segm": _METRICS, "cls": CLS_METRICS, "sem_seg": SEM_SEG_METRICS}
_CONFIG_PACKAGES = ("eqlosses_d2", "detectron2")
# Detectron2's file names: model_final_571f7c.pkl
_NAME_HASH = re.compile(r"_([0-9a-f]{6})\.[A-Za-z0-9]+$")


class ModelZooError(RuntimeError):
    """A model-zoo problem (unknown name, bad manifest, failed download or verification),
    reported in one line that names the entry, the URL or the file at fault."""


@dataclass(frozen=True)
class Checksum:
    """What a checkpoint must hash to: ``sha256`` (the full digest) or ``md5-prefix``
    (the first hex digits of its MD5, as Detectron2 names its files)."""

    kind: str
    value: str

    @property
    def algorithm(self) -> str:
        return "sha256" if self.kind == "sha256" else "md5"

    def matches(self, hexdigest: str) -> bool:
        if self.kind == "sha256":
            return hexdigest == self.value
        return hexdigest.startswith(self.value)

    def describe(self) -> str:
        if self.kind == "sha256":
            return f"sha256 {self.value}"
        return f"an MD5 starting with {self.value}"


@dataclass(frozen=True)
class Weights:
    url: str
    checksum: Checksum

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ModelZooEntry:
    name: str
    config: str
    config_package: str = "eqlosses_d2"
    opts: Tuple[str, ...] = ()
    setting: Dict[str, str] = field(default_factory=dict)
    weights: Optional[Weights] = None
    reported: Optional[dict] = None
    ours: Optional[dict] = None
    notes: str = ""

    @property
    def has_weights(self) -> bool:
        return self.weights is not None


def manifest_path() -> str:
    """The manifest in use (see the module docstring)."""
    override = os.environ.get(MANIFEST_ENV)
    if override:
        return override
    for candidate in (
        os.path.join(_PACKAGE_DIR, "model_zoo", "manifest.yaml"),
        os.path.join(os.path.dirname(_PACKAGE_DIR), "model_zoo", "manifest.yaml"),
    ):
        if os.path.isfile(candidate):
            return candidate
    raise ModelZooError(
        f"model-zoo manifest not found (looked in eqlosses_d2/model_zoo/ and model_zoo/ beside the "
        f"package; ${MANIFEST_ENV} names another)"
    )


_CACHE = {}


def load_manifest(path: Optional[str] = None) -> Dict[str, ModelZooEntry]:
    """{name: entry}, in manifest order; parsed once per file version."""
    path = path or manifest_path()
    try:
        stat = os.stat(path)
    except OSError:
        raise ModelZooError(f"model-zoo manifest not found: {path}") from None
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _parse(path)
    return _CACHE[key]


def _parse(path):
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelZooError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ModelZooError(f"{path}: expected a mapping with a 'models' list")
    entries = {}
    for index, raw in enumerate(data["models"]):
        entry = _parse_entry(raw, f"{path}: models[{index}]")
        if entry.name in entries:
            raise ModelZooError(f"{path}: model-zoo name '{entry.name}' appears twice")
        entries[entry.name] = entry
    return entries


def _parse_entry(raw, where):
    if not isinstance(raw, dict):
        raise ModelZooError(f"{where}: expected a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name or name != name.strip() or "://" in name:
        raise ModelZooError(f"{where}: 'name' must be a non-empty string without '://'")
    where = f"{where.split(': ')[0]}: entry '{name}'"
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    if unknown:
        raise ModelZooError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_ENTRY_KEYS))})")
    config = raw.get("config")
    if not isinstance(config, str) or not config.endswith(".yaml"):
        raise ModelZooError(f"{where}: 'config' must be a .yaml path relative to the configs directory")
    package = raw.get("config_package", "eqlosses_d2")
    if package not in _CONFIG_PACKAGES:
        raise ModelZooError(f"{where}: config_package must be one of {', '.join(_CONFIG_PACKAGES)}, not {package!r}")
    opts = raw.get("opts") or []
    if not isinstance(opts, list) or len(opts) % 2:
        raise ModelZooError(f"{where}: 'opts' must be a list of KEY VALUE pairs")
    setting = raw.get("setting")
    if not isinstance(setting, dict) or set(setting) != set(_SETTING_KEYS):
        raise ModelZooError(f"{where}: 'setting' must have exactly the keys {', '.join(_SETTING_KEYS)}")
    weights = _parse_weights(raw.get("weights"), where)
    reported = _parse_metrics(raw.get("reported"), f"{where}: reported", need_source=True)
    ours = _parse_metrics(raw.get("ours"), f"{where}: ours", need_source=False)
    synthetic = setting["dataset"] == "embedded synthetic data"
    if synthetic and reported is not None:
        raise ModelZooError(f"{where}: no paper reports numbers on the embedded synthetic data; use 'ours'")
    if ours is not None and synthetic and ours["data"] != SYNTHETIC_DATA:
        raise ModelZooError(f"{where}: ours.data must be exactly '{SYNTHETIC_DATA}' for the embedded data")
    # the one kind of numbers an entry's dataset has: cls (classification), sem_seg (semantic
    # segmentation), else bbox / segm (detection)
    if setting["dataset"] in CLASSIFICATION_DATASETS:
        task, allowed = "an image classifier", ("cls",)
    elif setting["dataset"] in SEM_SEG_DATASETS:
        task, allowed = "a semantic segmenter", ("sem_seg",)
    else:
        task, allowed = "a detector", ("bbox", "segm")
    for label, block in (("reported", reported), ("ours", ours)):
        wrong = [kind for kind in _TASK_METRICS if block is not None and block[kind] and kind not in allowed]
        if wrong:
            raise ModelZooError(f"{where}: {label}: {task} on '{setting['dataset']}' has {' / '.join(allowed)} numbers, "
                                f"not {' / '.join(wrong)}")
        if block is not None and not synthetic and not block["data"].startswith(str(setting["dataset"])):
            raise ModelZooError(
                f"{where}: {label}.data '{block['data']}' is not on the entry's dataset '{setting['dataset']}'"
            )
    notes = raw.get("notes", "")
    if not isinstance(notes, str):
        raise ModelZooError(f"{where}: 'notes' must be a string")
    return ModelZooEntry(
        name=name,
        config=config,
        config_package=package,
        opts=tuple(str(v) for v in opts),
        setting={k: str(setting[k]) for k in _SETTING_KEYS},
        weights=weights,
        reported=reported,
        ours=ours,
        notes=notes,
    )


def _parse_weights(raw, where):
    if raw in (None, "none"):
        return None
    if not isinstance(raw, dict):
        raise ModelZooError(f"{where}: 'weights' must be 'none' or a mapping with url and checksum")
    unknown = sorted(set(raw) - {"url", "checksum", "sha256", "md5_prefix"})
    if unknown:
        raise ModelZooError(f"{where}: weights: unknown key(s) {', '.join(unknown)}")
    url = raw.get("url")
    if not isinstance(url, str) or not re.match(r"^https?://[^/]+/.+", url):
        raise ModelZooError(f"{where}: weights.url must be an http(s) URL of a file")
    kind = raw.get("checksum")
    if kind == "sha256":
        value = str(raw.get("sha256", "")).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ModelZooError(f"{where}: weights.sha256 must be 64 hex digits")
    elif kind == "md5-prefix":
        value = str(raw.get("md5_prefix", "")).lower()
        if not re.fullmatch(r"[0-9a-f]{6,32}", value):
            raise ModelZooError(f"{where}: weights.md5_prefix must be at least 6 hex digits")
        named = _NAME_HASH.search(url)
        if named is None or not value.startswith(named.group(1)):
            raise ModelZooError(f"{where}: weights.md5_prefix {value} is not the hash in the file name of {url}")
    else:
        raise ModelZooError(f"{where}: weights.checksum must be 'sha256' or 'md5-prefix', not {kind!r}")
    return Weights(url=url, checksum=Checksum(kind, value))


def _parse_metrics(raw, where, need_source):
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ModelZooError(f"{where}: expected a mapping")
    unknown = sorted(set(raw) - _METRIC_KEYS)
    if unknown:
        raise ModelZooError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_METRIC_KEYS))})")
    if not isinstance(raw.get("data"), str) or not raw["data"]:
        raise ModelZooError(f"{where}: 'data' (what the numbers were measured on) is required")
    if need_source and not raw.get("source"):
        raise ModelZooError(f"{where}: 'source' (who reports these numbers) is required")
    block = {"source": str(raw.get("source", "")), "data": raw["data"]}
    for task, known in _TASK_METRICS.items():
        values = raw.get(task) or {}
        if not isinstance(values, dict):
            raise ModelZooError(f"{where}: {task} must map metric names to numbers")
        for metric, value in values.items():
            if metric not in known or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ModelZooError(f"{where}: {task}.{metric}: expected one of {', '.join(known)} with a number")
        block[task] = {k: float(v) for k, v in values.items()}
    if not any(block[task] for task in _TASK_METRICS):
        raise ModelZooError(f"{where}: no {', '.join(_TASK_METRICS)} numbers")
    return block


def normalize_name(name: str) -> str:
    """``eqlosses_d2://NAME``, ``NAME.yaml`` and ``configs/NAME.yaml`` all mean NAME."""
    name = name.strip()
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    if name.endswith(".yaml"):
        name = name[: -len(".yaml")]
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    return name


def find_entry(name: str, entries: Optional[Dict[str, ModelZooEntry]] = None) -> ModelZooEntry:
    """The entry of a model-zoo name; an unknown name fails naming its closest matches."""
    entries = load_manifest() if entries is None else entries
    key = normalize_name(name)
    if key in entries:
        return entries[key]
    raise ModelZooError(f"unknown model-zoo name '{name}'{close_matches_hint(key, entries)}")


def close_matches(name: str, entries: Optional[Dict[str, ModelZooEntry]] = None):
    """Up to 3 model-zoo names close to ``name`` (by the whole name, else by its file part)."""
    entries = load_manifest() if entries is None else entries
    name = normalize_name(name)
    matches = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.6)
    if not matches:
        # the file part alone often says more than the directory ("eqlv2_mask_rcnn_...")
        tails = {}
        for full in entries:
            tails.setdefault(full.rsplit("/", 1)[-1], full)
        matches = [tails[t] for t in difflib.get_close_matches(name.rsplit("/", 1)[-1], list(tails), n=3, cutoff=0.6)]
    return matches


def close_matches_hint(name: str, entries: Optional[Dict[str, ModelZooEntry]] = None) -> str:
    """'; close matches: a, b' or a pointer to the list (for one-line errors)."""
    matches = close_matches(name, entries)
    if matches:
        return "; close matches: " + ", ".join(matches)
    return "; see MODEL_ZOO.md or `python -m eqlosses_d2.model_zoo list`"
