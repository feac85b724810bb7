"""The model zoo: the manifest covers every shipped config and agrees with it, MODEL_ZOO.md is
generated from it, names resolve to configs, and checkpoints are downloaded once, verified,
cached, resumed, re-fetched when corrupt, shared safely between processes, used offline and
loaded without running code. Every download is from a server on loopback."""
import hashlib
import http.server
import logging
import multiprocessing
import os
import pickle
import queue
import re
import threading
import time

import numpy as np
import pytest
import torch
import yaml

from eqlosses_d2 import model_zoo
from eqlosses_d2.checkpoint import AtomicCheckpointer
from eqlosses_d2.model_zoo import ChecksumError, DownloadError, ModelZooError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_CONFIG = "quickstart/mask_rcnn_R18_FPN_synthetic.yaml"
SYNTHETIC_SETTING = {"dataset": "embedded synthetic data", "method": "softmax CE", "backbone": "R-18-FPN",
                     "schedule": "600 it × 4 img", "sampler": "random"}


# ----------------------------------------------------------------------------- loopback server


class _Files:
    """What the loopback server serves, and what it saw."""

    def __init__(self):
        self.files = {}  # url path -> bytes
        self.truncate = {}  # url path -> [bytes to send before closing, for each next full transfer]
        self.ignore_range = False
        self.chunk_delay = 0.0
        self.requests = []  # (path, Range header or None, status, bytes sent)
        self.lock = threading.Lock()

    def reset(self):
        self.files.clear()
        self.truncate.clear()
        self.ignore_range = False
        self.chunk_delay = 0.0
        with self.lock:
            self.requests.clear()

    def full_transfers(self, path):
        return [r for r in self.requests if r[0] == path and r[2] == 200]


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET with ``Range: bytes=N-`` (206 / 416), optional truncation and slow streaming.
    (Python's SimpleHTTPRequestHandler has no Range support.)"""

    state = None  # a _Files, set by the fixture

    def do_GET(self):
        state = self.state
        data = state.files.get(self.path)
        range_header = self.headers.get("Range")
        if data is None:
            self._log(range_header, 404, 0)
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and not state.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self._log(range_header, 416, 0)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            status = 206
        else:
            self.send_response(200)
            status = 200
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        cuts = state.truncate.get(self.path)
        limit = cuts.pop(0) if cuts else len(body)
        sent = 0
        try:
            while sent < limit:
                block = body[sent:min(limit, sent + 65536)]
                self.wfile.write(block)
                sent += len(block)
                if state.chunk_delay:
                    time.sleep(state.chunk_delay)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self._log(range_header, status, sent)
        self.close_connection = True

    def _log(self, range_header, status, sent):
        with self.state.lock:
            self.state.requests.append((self.path, range_header, status, sent))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    state = _Files()
    handler = type("Handler", (_RangeHandler,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def zoo(server, tmp_path, monkeypatch):
    """A private cache and a manifest of loopback entries (``zoo.add``); no proxy."""
    server.reset()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(model_zoo.CACHE_ENV, str(tmp_path / "cache"))
    manifest = tmp_path / "manifest.yaml"
    monkeypatch.setenv(model_zoo.MANIFEST_ENV, str(manifest))

    class Zoo:
        entries = []
        cache = tmp_path / "cache"

        def add(self, name, data=None, *, url_path=None, sha256=None, md5_prefix=None, opts=(), served=None):
            """An entry whose checkpoint ``data`` is served (``served`` instead, if given)."""
            entry = {"name": name, "config": QUICKSTART_CONFIG, "setting": dict(SYNTHETIC_SETTING)}
            if opts:
                entry["opts"] = list(opts)
            if data is None:
                entry["weights"] = "none"
            else:
                url_path = url_path or f"/{name}/model_final.pth"
                server.files[url_path] = data if served is None else served
                weights = {"url": server.base + url_path}
                if md5_prefix is not None:
                    weights.update(checksum="md5-prefix", md5_prefix=md5_prefix)
                else:
                    weights.update(checksum="sha256", sha256=sha256 or hashlib.sha256(data).hexdigest())
                entry["weights"] = weights
            self.entries.append(entry)
            manifest.write_text(yaml.safe_dump({"version": 1, "models": self.entries}, allow_unicode=True))
            return url_path

        def cached(self, name):
            return [p for p in (self.cache / name).rglob("*")] if (self.cache / name).exists() else []

    return Zoo()


def _blob(size=3 << 20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def _sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------- the shipped manifest


def _shipped():
    from eqlosses_d2.model_zoo.manifest import load_manifest

    return load_manifest(os.path.join(ROOT, "model_zoo", "manifest.yaml"))


def test_every_shipped_config_has_an_entry():
    configs = os.path.join(ROOT, "configs")
    shipped = {
        os.path.relpath(os.path.join(root, name), configs).replace(os.sep, "/")
        for root, _, files in os.walk(configs)
        for name in files
        if name.endswith(".yaml") and not name.startswith("Base-")
    }
    entries = _shipped()
    ours = {e.config for e in entries.values() if e.config_package == "eqlosses_d2"}
    assert sorted(shipped - ours) == [], "configs without a model-zoo entry"
    assert sorted(ours - shipped) == [], "entries whose config is not shipped"
    for entry in entries.values():
        if entry.config_package == "eqlosses_d2":
            assert entry.name == entry.config[: -len(".yaml")]


def _derived_setting(cfg):
    """Backbone, schedule and sampler as the manifest words them, read from a config."""
    res = cfg.MODEL.RESNETS
    fpn = "-FPN" if "fpn" in cfg.MODEL.BACKBONE.NAME else ""  # a classifier pools res5, DeepLab reads res2 / res5
    if res.NUM_GROUPS > 1:
        backbone = f"X-{res.DEPTH}-{res.NUM_GROUPS}x{res.WIDTH_PER_GROUP}d{fpn}"
    else:
        backbone = f"R-{res.DEPTH}{fpn}"
    its, batch = cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH
    schedule = f"{its // 90000}x" if batch == 16 and its % 90000 == 0 else f"{its} it × {batch} img"
    sampler = {"TrainingSampler": "random", "ClassBalancedTrainingSampler": "class-balanced",
               "SquareRootTrainingSampler": "square-root",
               "ClassDifficultyTrainingSampler": "class difficulty (CDB-S)"}.get(cfg.DATALOADER.SAMPLER_TRAIN)
    if cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler":
        sampler = f"RFS {cfg.DATALOADER.REPEAT_THRESHOLD:g}"
    return {"backbone": backbone, "schedule": schedule, "sampler": sampler}


def test_shipped_entries_agree_with_their_configs(monkeypatch):
    monkeypatch.delenv(model_zoo.MANIFEST_ENV, raising=False)
    for name, entry in _shipped().items():
        cfg = model_zoo.get_config(name)  # every config (ours and Detectron2's) merges
        for key, value in _derived_setting(cfg).items():
            assert entry.setting[key] == value or entry.setting[key].startswith(value + " "), (name, key)
        dataset = entry.setting["dataset"]
        if name.startswith("quickstart/"):
            assert dataset.startswith("embedded synthetic data") and entry.reported is None
            if dataset == "embedded synthetic data (classification)":
                assert cfg.DATASETS.TRAIN[0].startswith("synthetic_cls_lt")
                assert entry.ours is None or entry.ours["data"].startswith(dataset)
            elif dataset == "embedded synthetic data (semantic segmentation)":
                assert cfg.DATASETS.TRAIN[0].startswith("synthetic_lt_sem_seg")
                assert entry.ours is None or entry.ours["data"].startswith(dataset)
            else:
                assert entry.ours is None or entry.ours["data"] == model_zoo.SYNTHETIC_DATA
        else:
            prefix = {"LVIS v1": "lvis_v1", "LVIS v0.5": "lvis_v0.5", "ImageNet-LT": "imagenet_lt",
                      "iNaturalist 2018": "inaturalist2018", "CIFAR-100-LT": "cifar100_lt", "ADE20K": "ade20k_sem_seg"}[dataset]
            assert cfg.DATASETS.TRAIN[0].startswith(prefix)
            for block in (entry.reported, entry.ours):
                assert block is None or block["data"].startswith(dataset)


def test_detectron2_entries_match_detectron2s_url_table(monkeypatch):
    from eqlosses_d2.compat import import_detectron2_model_zoo

    monkeypatch.delenv(model_zoo.MANIFEST_ENV, raising=False)
    d2_zoo = import_detectron2_model_zoo()
    entries = _shipped()
    d2_entries = [e for e in entries.values() if e.config_package == "detectron2"]
    assert len(d2_entries) == 3
    for entry in entries.values():
        if entry.config_package != "detectron2":
            assert entry.weights is None, "no checkpoint of ours is published: no URL may be invented"
            continue
        assert entry.name == "Detectron2/" + entry.config[: -len(".yaml")]
        assert entry.weights.url == d2_zoo.get_checkpoint_url(entry.config)
        if entry.weights.checksum.kind == "md5-prefix":  # until someone pins the full sha256
            assert entry.weights.url.endswith(f"_{entry.weights.checksum.value}.pkl")
        # Detectron2's config, with our keys and our RoI head: calibration keys can be set
        cfg = model_zoo.get_config(entry.name, trained=True)
        assert cfg.MODEL.ROI_HEADS.NAME == "LongTailStandardROIHeads"
        assert cfg.MODEL.WEIGHTS == "eqlosses_d2://" + entry.name
        cfg.merge_from_list(["TEST.EQLOSSES.CALIBRATION.METHOD", "norcal"])
        assert model_zoo.get_checkpoint_url(entry.name) == entry.weights.url


def test_model_zoo_md_is_generated_from_the_manifest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_model_zoo_md", os.path.join(ROOT, "model_zoo",
                                                                                        "generate_model_zoo_md.py"))
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    with open(os.path.join(ROOT, "MODEL_ZOO.md"), encoding="utf-8") as f:
        assert f.read() == generator.render(_shipped()), "run python model_zoo/generate_model_zoo_md.py"
    text = generator.render(_shipped())
    # the synthetic numbers have a table of their own, after the LVIS ones
    assert text.index("## LVIS v1") < text.index("## Embedded synthetic data, quickstart schedule")
    synthetic = text[text.index("## Embedded synthetic data"):]
    assert "| 46.50 | 26.01 / 46.72 / 62.63 | 50.63 |" in synthetic
    assert "46.50" not in text[: text.index("## Embedded synthetic data")]


# ----------------------------------------------------------------------------- names and errors


def test_names_resolve_and_bad_names_fail_in_one_line(monkeypatch):
    from detectron2.config import get_cfg

    from eqlosses_d2 import add_eqlosses_config
    from eqlosses_d2.config import ConfigError, merge_config_file

    monkeypatch.delenv(model_zoo.MANIFEST_ENV, raising=False)
    name = "LVISv1-InstanceSegmentation/eqlv2_mask_rcnn_R_50_FPN_1x"
    path = model_zoo.get_config_file(name)
    assert path.endswith(name + ".yaml") and os.path.isfile(path)
    for spelling in (name, name + ".yaml", "configs/" + name + ".yaml", "eqlosses_d2://" + name):
        assert model_zoo.get_config_file(spelling) == path
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, name)  # what --config-file NAME does
    assert cfg.MODEL.EQLOSSES.LOSS == "eqlv2"

    with pytest.raises(ModelZooError) as e:
        model_zoo.get_config("LVISv1-InstanceSegmentation/eqlv3_mask_rcnn_R_50_FPN_1x")
    message = str(e.value)
    assert "\n" not in message and "eqlv3" in message and "close matches: " + name in message
    with pytest.raises(ModelZooError, match="no published checkpoint.*config only"):
        model_zoo.get_config("quickstart/mask_rcnn_R18_FPN_synthetic", trained=True)
    with pytest.raises(ModelZooError, match="no published checkpoint"):
        model_zoo.get_checkpoint_url("quickstart/mask_rcnn_R18_FPN_synthetic")
    with pytest.raises(ConfigError) as e:
        merge_config_file(get_cfg(), "LVISv1-InstanceSegmentation/eqlv2_mask_rcnn_R_50_FPN_3x")
    assert "config file not found" in str(e.value) and name in str(e.value) and "\n" not in str(e.value)


def test_command_line(monkeypatch, capsys):
    from eqlosses_d2.model_zoo.__main__ import main

    monkeypatch.delenv(model_zoo.MANIFEST_ENV, raising=False)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "Detectron2/LVISv0.5-InstanceSegmentation/mask_rcnn_R_50_FPN_1x\tcheckpoint (md5-prefix)" in out
    assert "quickstart/mask_rcnn_R18_FPN_synthetic\tconfig only" in out
    assert main(["config", "quickstart/mask_rcnn_R18_FPN_synthetic"]) == 0
    assert capsys.readouterr().out.strip().endswith("mask_rcnn_R18_FPN_synthetic.yaml")
    assert main(["fetch", "quickstart/mask_rcnn_R18_FPN_synthetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eqlosses_d2.model_zoo: error:") and "\n" not in err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weights": {"url": "https://example.org/m.pth", "checksum": "sha256"}}, "weights.sha256 must be 64 hex"),
        ({"weights": {"url": "https://example.org/model_final_abcdef.pkl", "checksum": "md5-prefix",
                      "md5_prefix": "123456"}}, "not the hash in the file name"),
        ({"weights": {"url": "https://example.org/m.pth", "checksum": "crc32"}}, "weights.checksum must be"),
        ({"wieghts": "none"}, "unknown key.*wieghts"),
        ({"reported": {"source": "a paper", "data": "LVIS v1 val", "segm": {"AP": 20.0}}},
         "no paper reports numbers on the embedded synthetic data"),
        ({"ours": {"data": "LVIS v1 val", "segm": {"AP": 20.0}}}, "ours.data must be exactly"),
        ({"ours": {"data": model_zoo.SYNTHETIC_DATA, "segm": {"mAP": 20.0}}}, r"segm\.mAP"),
        ({"setting": {"dataset": "LVIS v1"}}, "'setting' must have exactly the keys"),
        ({"ours": {"data": model_zoo.SYNTHETIC_DATA, "cls": {"top1": 50.0}}},
         "a detector on 'embedded synthetic data' has bbox / segm numbers, not cls"),
        ({"setting": {**SYNTHETIC_SETTING, "dataset": "ImageNet-LT"},
          "reported": {"source": "a paper", "data": "ImageNet-LT test", "bbox": {"AP": 20.0}}},
         "an image classifier on 'ImageNet-LT' has cls numbers, not bbox"),
        ({"setting": {**SYNTHETIC_SETTING, "dataset": "ADE20K"},
          "reported": {"source": "a paper", "data": "ADE20K val", "segm": {"AP": 20.0}}},
         "a semantic segmenter on 'ADE20K' has sem_seg numbers, not segm"),
        ({"setting": {**SYNTHETIC_SETTING, "dataset": "ADE20K"},
          "reported": {"source": "a paper", "data": "ADE20K val", "sem_seg": {"mIoU-x": 20.0}}}, r"sem_seg\.mIoU-x"),
        ({"ours": {"data": model_zoo.SYNTHETIC_DATA, "sem_seg": {"mIoU": 50.0}}},
         "a detector on 'embedded synthetic data' has bbox / segm numbers, not sem_seg"),
        ({"setting": {**SYNTHETIC_SETTING, "dataset": "ImageNet-LT"},
          "reported": {"source": "a paper", "data": "ImageNet-LT test", "cls": {"AP": 20.0}}}, r"cls\.AP"),
    ],
)
def test_bad_manifest_entries_fail_in_one_line(tmp_path, change, message):
    from eqlosses_d2.model_zoo.manifest import load_manifest

    entry = {"name": "pytest/bad", "config": QUICKSTART_CONFIG, "setting": dict(SYNTHETIC_SETTING), "weights": "none"}
    entry.update(change)
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}, allow_unicode=True))
    with pytest.raises(ModelZooError, match=message) as e:
        load_manifest(str(path))
    assert "\n" not in str(e.value) and "pytest/bad" in str(e.value) and str(path) in str(e.value)


def test_classification_entries_get_accuracy_columns(tmp_path):
    """An image classifier's row shows top-1, top-5 and many / medium / few, not box / mask AP."""
    from eqlosses_d2.model_zoo.docs import render_model_zoo_md
    from eqlosses_d2.model_zoo.manifest import load_manifest

    entry = {"name": "pytest/cls", "config": QUICKSTART_CONFIG, "weights": "none",
             "setting": {**SYNTHETIC_SETTING, "dataset": "ImageNet-LT"},
             "reported": {"source": "a paper", "data": "ImageNet-LT test",
                          "cls": {"top1": 49.6, "many": 61.8, "medium": 46.2, "few": 27.4}}}
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}, allow_unicode=True))
    text = render_model_zoo_md(load_manifest(str(path)))
    assert "| top-1 | top-5 | many / medium / few |" in text and "box AP" not in text
    assert "| 49.6 |  | 61.8 / 46.2 / 27.4 | a paper |" in text


# ----------------------------------------------------------------------------- downloads


def test_download_then_cache_hit(zoo, server):
    from detectron2.utils.file_io import PathManager

    data = _blob()
    url_path = zoo.add("pytest/blob", data)
    path = model_zoo.get_checkpoint_path("pytest/blob")
    assert path == str(zoo.cache / "pytest" / "blob" / "model_final.pth")
    assert open(path, "rb").read() == data
    assert len(server.full_transfers(url_path)) == 1
    assert not [p for p in zoo.cached("pytest") if p.name.endswith(".part")]
    # cache hit: verified again, no request; the same through Detectron2's PathManager
    assert PathManager.get_local_path("eqlosses_d2://pytest/blob") == path
    with PathManager.open("eqlosses_d2://pytest/blob", "rb") as f:
        assert f.read(16) == data[:16]
    assert PathManager.exists("eqlosses_d2://pytest/blob")
    assert len(server.requests) == 1
    # force: fetched again
    assert model_zoo.get_checkpoint_path("pytest/blob", force=True) == path
    assert len(server.full_transfers(url_path)) == 2


def test_checksum_mismatch_deletes_the_download(zoo, server):
    data = _blob(1 << 20)
    expected = hashlib.sha256(b"something else").hexdigest()
    url_path = zoo.add("pytest/bad", data, sha256=expected)
    with pytest.raises(ChecksumError) as e:
        model_zoo.get_checkpoint_path("pytest/bad")
    message = str(e.value)
    assert "\n" not in message
    for part in ("pytest/bad", server.base + url_path, expected, hashlib.sha256(data).hexdigest()):
        assert part in message
    assert [p for p in zoo.cached("pytest/bad") if not p.name.endswith(".lock")] == []


def test_truncated_transfer_is_resumed(zoo, server):
    data = _blob()
    url_path = zoo.add("pytest/blob", data)
    server.truncate[url_path] = [1 << 20]
    path = model_zoo.get_checkpoint_path("pytest/blob")
    assert _sha256_of(path) == hashlib.sha256(data).hexdigest()
    ranges = [r for r in server.requests if r[1] is not None]
    assert ranges == [(url_path, f"bytes={1 << 20}-", 206, len(data) - (1 << 20))]
    assert sum(r[3] for r in server.requests) == len(data)  # no byte sent twice


def test_a_partial_file_left_by_another_process_is_resumed(zoo, server):
    data = _blob()
    url_path = zoo.add("pytest/blob", data)
    part = zoo.cache / "pytest" / "blob" / "model_final.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:123457])
    path = model_zoo.get_checkpoint_path("pytest/blob")
    assert open(path, "rb").read() == data
    assert server.requests == [(url_path, "bytes=123457-", 206, len(data) - 123457)]


def test_a_complete_partial_file_is_verified_and_kept(zoo, server):
    """A process killed between the last byte and the rename leaves a whole .part file."""
    data = _blob(1 << 20)
    url_path = zoo.add("pytest/blob", data)
    part = zoo.cache / "pytest" / "blob" / "model_final.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data)
    assert open(model_zoo.get_checkpoint_path("pytest/blob"), "rb").read() == data
    assert server.requests == [(url_path, f"bytes={len(data)}-", 416, 0)]


def test_a_bad_partial_file_is_downloaded_again(zoo, server):
    data = _blob()
    url_path = zoo.add("pytest/blob", data)
    part = zoo.cache / "pytest" / "blob" / "model_final.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # not the file's first bytes
    path = model_zoo.get_checkpoint_path("pytest/blob")
    assert open(path, "rb").read() == data
    assert [r[:3] for r in server.requests] == [(url_path, "bytes=1000-", 206), (url_path, None, 200)]


def test_a_server_without_range_support_sends_it_all_again(zoo, server):
    data = _blob()
    url_path = zoo.add("pytest/blob", data)
    server.ignore_range = True
    server.truncate[url_path] = [1 << 20]
    path = model_zoo.get_checkpoint_path("pytest/blob")
    assert open(path, "rb").read() == data
    assert [r[1:] for r in server.requests] == [(None, 200, 1 << 20), (f"bytes={1 << 20}-", 200, len(data))]


def test_corrupt_cache_is_detected_and_fetched_again(zoo, server, caplog):
    data = _blob()
    url_path = zoo.add("pytest/blob", data)
    path = model_zoo.get_checkpoint_path("pytest/blob")
    stat = os.stat(path)
    with open(path, "r+b") as f:  # flip one byte, keep size and mtime
        f.seek(len(data) // 2)
        f.write(bytes([data[len(data) // 2] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with caplog.at_level(logging.WARNING, logger="eqlosses_d2.model_zoo.download"):
        assert model_zoo.get_checkpoint_path("pytest/blob") == path
    assert "corrupt" in caplog.text and path in caplog.text
    assert open(path, "rb").read() == data
    assert len(server.full_transfers(url_path)) == 2


def test_offline_with_a_cached_file(zoo, server, monkeypatch):
    data = _blob(1 << 20)
    zoo.add("pytest/blob", data)
    path = model_zoo.get_checkpoint_path("pytest/blob")
    # offline: any network access fails; the verified cached copy is used without any
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("network access while a verified copy is cached")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert model_zoo.get_checkpoint_path("pytest/blob") == path
    assert len(server.requests) == 1


def test_offline_without_a_cached_file_fails_in_one_line(zoo, server, monkeypatch):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    closed_port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    zoo.add("pytest/blob", _blob(1000))
    zoo.entries[-1]["weights"]["url"] = f"http://127.0.0.1:{closed_port}/model_final.pth"
    (zoo.cache.parent / "manifest.yaml").write_text(yaml.safe_dump({"models": zoo.entries}, allow_unicode=True))
    with pytest.raises(DownloadError) as e:
        model_zoo.get_checkpoint_path("pytest/blob")
    assert "\n" not in str(e.value) and "cannot reach" in str(e.value) and str(zoo.cache) in str(e.value)


def test_http_errors_fail_in_one_line(zoo, server):
    url_path = zoo.add("pytest/blob", _blob(1000))
    del server.files[url_path]
    with pytest.raises(DownloadError, match="HTTP 404") as e:
        model_zoo.get_checkpoint_path("pytest/blob")
    assert "\n" not in str(e.value) and "pytest/blob" in str(e.value)


def _fetch_in_process(env, barrier, results):
    """One of the concurrent processes: start together, fetch, report (path, sha256)."""
    os.environ.update(env)
    from eqlosses_d2 import model_zoo as zoo_api

    barrier.wait()
    try:
        path = zoo_api.get_checkpoint_path("pytest/blob")
        results.put((path, _sha256_of(path)))
    except Exception as e:  # reported to the test, not lost in a child's stderr
        results.put(("error", f"{type(e).__name__}: {e}"))


def test_two_processes_downloading_at_once(zoo, server):
    data = _blob(2 << 20)
    url_path = zoo.add("pytest/blob", data)
    server.chunk_delay = 0.05  # 32 blocks of 64 KiB: a transfer takes ~1.6 s
    env = {k: os.environ[k] for k in (model_zoo.CACHE_ENV, model_zoo.MANIFEST_ENV, "no_proxy")}
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_process, args=(env, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcome, deadline = [], time.time() + 180
    while len(outcome) < len(procs) and time.time() < deadline:
        try:
            outcome.append(results.get(timeout=1))
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=30)
    expected = (str(zoo.cache / "pytest" / "blob" / "model_final.pth"), hashlib.sha256(data).hexdigest())
    assert outcome == [expected, expected], [p.exitcode for p in procs]
    assert len(server.full_transfers(url_path)) == 1 and len(server.requests) == 1
    assert not [p for p in zoo.cached("pytest") if p.name.endswith(".part")]


# ----------------------------------------------------------------------------- safe loading


def _detectron2_pickle(state_dict, protocol=2):
    return pickle.dumps({"model": {k: v.numpy() for k, v in state_dict.items()}, "__author__": "Detectron2 Model Zoo"},
                        protocol=protocol)


class _Marker:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", [2, 5])
def test_detectron2_pickle_verified_by_md5_prefix_loads(zoo, protocol):
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    data = _detectron2_pickle(theirs.state_dict(), protocol)
    md5 = hashlib.md5(data).hexdigest()
    zoo.add("pytest/d2", data, url_path=f"/d2/model_final_{md5[:6]}.pkl", md5_prefix=md5[:6])
    ours = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    AtomicCheckpointer(ours).load("eqlosses_d2://pytest/d2")
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_a_file_that_fails_verification_is_never_unpickled(zoo, tmp_path, monkeypatch):
    import eqlosses_d2.checkpoint as checkpoint

    marker = tmp_path / "code_ran"
    served = pickle.dumps({"model": {}, "__author__": "x", "payload": _Marker(str(marker))})
    good = b"the real file"
    md5 = hashlib.md5(good).hexdigest()
    zoo.add("pytest/d2", good, url_path=f"/d2/model_final_{md5[:6]}.pkl", md5_prefix=md5[:6], served=served)
    calls = []
    monkeypatch.setattr(checkpoint, "load_pickled_checkpoint", lambda *a: calls.append(a))
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(ChecksumError, match=f"pytest/d2.*an MD5 starting with {md5[:6]}"):
        AtomicCheckpointer(torch.nn.Linear(1, 1)).load("eqlosses_d2://pytest/d2")
    assert calls == [] and not marker.exists()
    assert [p for p in zoo.cached("pytest/d2") if not p.name.endswith(".lock")] == []


def test_pickles_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "code_ran"
    payload = {"model": {"w": np.zeros(2)}, "__author__": "x", "payload": _Marker(str(marker))}
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="evil.pkl.*open.*not allowed") as e:
        AtomicCheckpointer(torch.nn.Linear(1, 1)).load(str(pkl))
    assert "\n" not in str(e.value)
    pth = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Marker(str(marker))}, pth)
    with pytest.raises(pickle.UnpicklingError, match="evil.pth.*refusing"):
        AtomicCheckpointer(torch.nn.Linear(1, 1)).load(str(pth))
    assert not marker.exists()


def test_caffe2_style_pickles_still_load(tmp_path):
    """Detectron2's handling of what a .pkl holds is kept: Caffe2 blobs, momentum dropped."""
    from collections import OrderedDict

    blobs = OrderedDict([("conv1_w", np.ones((2, 2), np.float32)), ("conv1_w_momentum", np.zeros(1))])
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    checkpointer = AtomicCheckpointer(torch.nn.Linear(1, 1))
    loaded = checkpointer._load_file(str(path))
    assert loaded["__author__"] == "Caffe2" and loaded["matching_heuristics"]
    assert list(loaded["model"]) == ["conv1_w"]


# ----------------------------------------------------------------------------- train_net end to end


def test_eval_only_with_a_model_zoo_name(zoo, server, tiny_dataset, tmp_path, capsys, monkeypatch):
    """Publish a quickstart checkpoint (the model train_net builds, with the training set's
    class statistics, saved as training saves it) on the loopback server as a model-zoo
    entry, then evaluate it by name only, from an empty cache."""
    import train_net
    from detectron2.config import get_cfg
    from test_training import _assert_lvis_results, _opts, _run

    from eqlosses_d2 import add_eqlosses_config

    spec = tiny_dataset["spec"]
    opts = _opts(tiny_dataset, tmp_path / "eval", max_iter=3) + ["TEST.DETECTIONS_PER_IMAGE", "50"]
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", QUICKSTART_CONFIG))
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    published = train_net.Trainer.build_model(cfg)
    AtomicCheckpointer(published, str(tmp_path)).save("model_final")
    data = (tmp_path / "model_final.pth").read_bytes()
    name = "quickstart/pytest_tiny"
    zoo.add(name, data, opts=["MODEL.ROI_HEADS.NUM_CLASSES", str(spec.num_categories)])

    evaluated = {}
    original_test = train_net.Trainer.test.__func__

    def spy_test(cls, cfg, model, evaluators=None):
        evaluated["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return original_test(cls, cfg, model, evaluators)

    monkeypatch.setattr(train_net.Trainer, "test", classmethod(spy_test))
    eval_opts = opts + ["MODEL.EQLOSSES.CLASS_STATS_DATASET", "no_such_dataset"]  # stats come from the checkpoint
    results = _run(["--config-file", name, "--eval-only"] + eval_opts + ["MODEL.WEIGHTS", "eqlosses_d2://" + name])
    _assert_lvis_results(results)
    for key, value in published.state_dict().items():
        assert torch.equal(evaluated["state"][key], value), key
    assert bool(evaluated["state"]["roi_heads.class_stats.is_set"])
    assert len(server.requests) == 1  # check_args fetched it; main used the verified cache

    # the Python API gives the same weights
    model = model_zoo.get(name, trained=True, device="cpu")
    for key, value in published.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    # bad names fail in the launching process, in one line, naming close matches
    def error(args):
        assert train_net.cli(args) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (after any log lines)
        assert err.startswith("train_net.py: error:")
        return err

    def argv(config, weights=()):
        return ["--config-file", config, "--eval-only"] + eval_opts + (["MODEL.WEIGHTS", weights] if weights else [])

    typo = "quickstart/pytest_tiyn"
    assert name in error(argv(name, "eqlosses_d2://" + typo))
    assert name in error(argv(typo))
    assert "eqlosses_d2://" + name in error(argv(name, name))
    zoo.add("pytest/config_only")
    err = error(argv(name, "eqlosses_d2://pytest/config_only"))
    assert "pytest/config_only" in err and "no published checkpoint" in err


# -- issue 18 item 7: the generated parts stay generated ------------------------------------------


def test_readme_methods_table_and_model_zoo_md_are_generated():
    """README.md's method table (between its markers) and MODEL_ZOO.md are what
    ``python -m eqlosses_d2.model_zoo.docs --write`` writes from the registry and the manifest."""
    from eqlosses_d2.model_zoo import docs

    assert docs.check() == [], "run python -m eqlosses_d2.model_zoo.docs --write"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = readme[readme.index(docs.METHODS_BEGIN):readme.index(docs.METHODS_END)]
    from eqlosses_d2.registry import ROI_CLS_LOSS_REGISTRY, names

    for name in names(ROI_CLS_LOSS_REGISTRY):  # a row per registered loss
        assert f"| `{name}` |" in table, name
    assert "| `eqlv2` | EQLv2 (Tan et al., CVPR 2021) | 1x random: mask AP 23.7" in table


def test_docs_rewrite_only_the_marked_region_and_follow_the_registry(tmp_path):
    from eqlosses_d2.losses import ClassificationLoss
    from eqlosses_d2.model_zoo import docs
    from eqlosses_d2.registry import ROI_CLS_LOSS_REGISTRY, register

    readme = tmp_path / "README.md"
    text = f"# title\n\nbefore\n{docs.METHODS_BEGIN}\n| old |\n{docs.METHODS_END}\nafter\n"
    readme.write_text(text)
    paths = dict(readme=str(readme), model_zoo_md=str(tmp_path / "MODEL_ZOO.md"),
                 manifest=os.path.join(ROOT, "model_zoo", "manifest.yaml"))
    assert sorted(docs.check(**paths)) == sorted([str(readme), str(tmp_path / "MODEL_ZOO.md")])

    class NewLoss(ClassificationLoss):
        name = "new_method_for_the_table"
        doc_method = "A new method (Someone et al., 2031)"
        doc_paper = "mask AP 99.9"

    register(ROI_CLS_LOSS_REGISTRY)(NewLoss)
    try:
        assert len(docs.write(**paths)) == 2 and docs.check(**paths) == []
    finally:
        del ROI_CLS_LOSS_REGISTRY._obj_map[NewLoss.name]
    written = readme.read_text()
    assert written.startswith("# title\n\nbefore\n" + docs.METHODS_BEGIN + "\n| `LOSS` |")
    assert written.endswith(docs.METHODS_END + "\nafter\n") and "| old |" not in written
    assert "| `new_method_for_the_table` | A new method (Someone et al., 2031) | mask AP 99.9 | |\n" in written
    readme.write_text("no markers\n")
    with pytest.raises(model_zoo.ModelZooError, match="markers .* are missing"):
        docs.write(**paths)


def test_docs_command_check(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-W", "ignore", "-m", "eqlosses_d2.model_zoo.docs", "--check"], cwd=ROOT,
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
