"""The quickstart study (issue: evidence with error bars): benchmarks/study.py's statistics
against values derived by hand, the results file, the README tables generated from it, and
benchmarks/train_methods.py's seeded schedule."""
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import study  # noqa: E402
import train_methods  # noqa: E402


# -- Student's t ------------------------------------------------------------------------------

@pytest.mark.parametrize("df,expected", [
    # published two-sided 95% critical values (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
    (1, 12.706205), (2, 4.302653), (3, 3.182446), (4, 2.776445), (10, 2.228139), (30, 2.042272),
])
def test_t_quantile_matches_the_published_table(df, expected):
    assert study.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-6)


def test_t_cdf_closed_forms():
    # df 1 is Cauchy: P(T <= x) = 1/2 + atan(x)/pi; df 2: 1/2 + x / (2 sqrt(2 + x^2))
    for x in (0.3, 1.0, 4.0):
        assert study.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-9)
        assert study.t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-9)
        assert study.t_cdf(-x, 2) == pytest.approx(1 - study.t_cdf(x, 2), abs=1e-12)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="t_quantile"):
        study.t_quantile(0.4, 3)
    with pytest.raises(ValueError, match="t_quantile"):
        study.t_quantile(0.975, 0)


# -- summaries -------------------------------------------------------------------------------

def test_mean_sd_is_the_sample_standard_deviation():
    mean, sd = study.mean_sd([30.0, 33.0, 27.0])
    assert mean == pytest.approx(30.0)
    assert sd == pytest.approx(3.0)  # sqrt((0 + 9 + 9) / 2)
    mean, sd = study.mean_sd([5.0])
    assert mean == 5.0 and math.isnan(sd)


def test_paired_interval_by_hand():
    method = {0: 30.0, 1: 33.0, 2: 27.0, 7: 99.0}  # seed 7 has no baseline: not paired
    base = {0: 28.0, 1: 29.0, 2: 28.0}
    mean, low, high, n = study.paired_interval(method, base)
    # differences 2, 4, -1: mean 5/3, sd sqrt(((1/3)^2 + (7/3)^2 + (8/3)^2) / 2) = sqrt(19/3)
    sd = math.sqrt(19 / 3)
    half = 4.302653 * sd / math.sqrt(3)
    assert n == 3
    assert mean == pytest.approx(5 / 3)
    assert low == pytest.approx(5 / 3 - half, abs=1e-5)
    assert high == pytest.approx(5 / 3 + half, abs=1e-5)
    assert (low, high) == pytest.approx((-4.584941, 7.918274), abs=1e-5)


def test_paired_interval_with_fewer_than_two_seeds():
    mean, low, high, n = study.paired_interval({0: 31.0}, {0: 30.0, 1: 29.0})
    assert (mean, n) == (1.0, 1) and math.isnan(low) and math.isnan(high)
    mean, low, high, n = study.paired_interval({3: 31.0}, {0: 30.0})
    assert n == 0 and math.isnan(mean)


def test_baselines():
    assert study.baseline_of("softmax") is None
    assert study.baseline_of("eqlv2") == "softmax"
    assert study.baseline_of("norcal") == "softmax"
    assert study.baseline_of("focal_retinanet") is None
    assert study.baseline_of("efl_retinanet") == "focal_retinanet"
    assert study.baseline_of("efl_fcos") == "focal_fcos"


# -- the results file and the tables -----------------------------------------------------------

def _result_json(tmp_path, name, box, mask=None):
    results = {"bbox": dict(zip(("AP", "APr", "APc", "APf", "AP50"), box))}
    if mask:
        results["segm"] = dict(zip(("AP", "APr", "APc", "APf"), mask))
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"config": "configs/quickstart/x.yaml", "opts": ["SEED", "0"], "finished": "2026-12-03 10:00 UTC",
                                "threads": 1, "wall_s": 700.0, "s_per_iter": 1.2, "results": results}))
    return str(path)


def _study(tmp_path):
    path = str(tmp_path / "results" / "study.json")
    rows = {  # (method, seed): box AP, APr, APc, APf
        ("softmax", 0): (40.0, 20.0, 40.0, 60.0), ("softmax", 1): (42.0, 22.0, 41.0, 61.0),
        ("softmax", 2): (41.0, 18.0, 42.0, 62.0),
        ("eqlv2", 0): (41.0, 30.0, 39.0, 60.0), ("eqlv2", 1): (43.0, 31.0, 40.0, 61.0),
        ("eqlv2", 2): (42.0, 29.0, 41.0, 62.0),
        ("seesaw", 0): (40.0, 24.0, 40.0, 60.0),
    }
    for (method, seed), box in rows.items():
        study.merge_run(path, "standard", method, seed, _result_json(tmp_path, f"{method}{seed}", box, box))
    return path


def test_merge_run_keeps_one_record_per_run_and_replaces(tmp_path):
    path = _study(tmp_path)
    data = study.load(path)
    assert len(data["runs"]) == 7
    assert [(r["method"], r["seed"]) for r in data["runs"]][:3] == [("eqlv2", 0), ("eqlv2", 1), ("eqlv2", 2)]
    run = data["runs"][0]
    assert run["bbox"] == {"AP": 41.0, "APr": 30.0, "APc": 39.0, "APf": 60.0}  # AP50 not kept
    assert run["head"] == "standard" and run["threads"] == 1 and run["s_per_iter"] == 1.2 and run["machine"]
    study.merge_run(path, "standard", "eqlv2", 0, _result_json(tmp_path, "again", (50.0, 1.0, 2.0, 3.0)))
    data = study.load(path)
    assert len(data["runs"]) == 7
    assert data["runs"][0]["bbox"]["AP"] == 50.0 and "segm" not in data["runs"][0]
    assert not os.path.exists(path + ".tmp")


def test_load_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="x.json: not a study results file"):
        study.load(str(path))


def test_tables(tmp_path):
    text = study.format_head(study.load(_study(tmp_path)), "standard")
    lines = text.splitlines()
    # the baseline first; mean ± sd over seeds; one seed: the value alone
    assert lines[2] == ("| softmax | 0,1,2 | 41.00 ± 1.00 | 20.00 ± 2.00 | 41.00 ± 1.00 | 61.00 ± 1.00 "
                        "| 41.00 ± 1.00 | 20.00 ± 2.00 | 41.00 ± 1.00 | 61.00 ± 1.00 |")
    assert lines[3].startswith("| eqlv2 | 0,1,2 | 42.00 ± 1.00 | 30.00 ± 1.00 |")
    assert lines[4].startswith("| seesaw | 0 | 40.00 | 24.00 | 40.00 | 60.00 |")
    eqlv2 = next(line for line in lines if line.startswith("| eqlv2 | softmax |"))
    cells = [c.strip() for c in eqlv2.strip("|").split("|")]
    # box AP: differences 1, 1, 1 (sd 0): [+1.00, +1.00], beyond 0
    assert cells[3] == "**+1.00 [+1.00, +1.00]**"
    # box APr: differences 10, 9, 11: mean 10, sd 1, half 4.302653 / sqrt(3) = 2.48414
    assert cells[4] == "**+10.00 [+7.52, +12.48]**"
    # APc and APf: differences -1, -1, -1 and 0, 0, 0
    assert cells[5] == "**-1.00 [-1.00, -1.00]**"
    assert cells[6] == "+0.00 [+0.00, +0.00]"
    seesaw = next(line for line in lines if line.startswith("| seesaw | softmax |"))
    assert seesaw.startswith("| seesaw | softmax | 1 | +0.00 | +4.00 |")


def test_interval_that_contains_zero_is_not_bold(tmp_path):
    path = str(tmp_path / "s.json")
    for seed, (b, m) in enumerate([(30.0, 31.0), (30.0, 28.0), (30.0, 32.0)]):
        study.merge_run(path, "cascade", "softmax", seed, _result_json(tmp_path, f"b{seed}", (b, b, b, b)))
        study.merge_run(path, "cascade", "gumbel", seed, _result_json(tmp_path, f"m{seed}", (m, m, m, m)))
    row = next(line for line in study.format_tables(study.load(path)).splitlines() if line.startswith("| gumbel | softmax"))
    # differences 1, -2, 2: mean 1/3, sd sqrt(13/3), half 4.302653 * sqrt(13/9) = 5.17108
    assert "| +0.33 [-4.84, +5.50] |" in row and "**" not in row


def test_render_readme_replaces_only_the_marked_blocks(tmp_path):
    data = study.load(_study(tmp_path))
    text = "intro\n<!-- study:standard -->\nold table\n<!-- /study:standard -->\nafter\n"
    new = study.render_readme(text, data)
    assert new.startswith("intro\n<!-- study:standard -->\n| method | seeds |")
    assert new.endswith("\n<!-- /study:standard -->\nafter\n")
    assert study.render_readme(new, data) == new
    with pytest.raises(ValueError, match="README.md: no '<!-- study:standard -->'"):
        study.render_readme("no markers", data)


def test_readme_tables_come_from_the_committed_results():
    """Numbers never live only in prose: the README's study tables are the committed file's."""
    assert os.path.isfile(study.DEFAULT_RESULTS), "benchmarks/results/quickstart_study.json is missing"
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    data = study.load(study.DEFAULT_RESULTS)
    assert study.render_readme(text, data) == text, "run: python benchmarks/study.py --readme README.md"
    for run in data["runs"]:
        assert run["seed"] in (0, 1, 2, 3, 4) and run["bbox"]["AP"] >= 0 and run["finished"] and run["machine"]


# -- train_methods' schedule ------------------------------------------------------------------

def test_schedule_is_seed_by_seed_and_skips_what_does_not_apply(tmp_path):
    out = str(tmp_path)
    tasks = train_methods.schedule(["standard", "cascade", "one_stage"], ["softmax", "loce", "norcal", "eqlv2", "efl_fcos"],
                                   [0, 1], out)
    keys = [(h, m, s) for h, m, s, _, _ in tasks]
    assert keys == [
        ("standard", "softmax", 0), ("standard", "loce", 0), ("standard", "norcal", 0), ("standard", "eqlv2", 0),
        ("cascade", "softmax", 0), ("cascade", "eqlv2", 0), ("one_stage", "efl_fcos", 0),
        ("standard", "softmax", 1), ("standard", "loce", 1), ("standard", "norcal", 1), ("standard", "eqlv2", 1),
        ("cascade", "softmax", 1), ("cascade", "eqlv2", 1), ("one_stage", "efl_fcos", 1),
    ]
    loce = tasks[1]
    assert loce[3] == os.path.join(out, "standard", "loce", "seed0")
    assert loce[4] == ["MODEL.WEIGHTS", os.path.join(out, "standard", "softmax", "seed0", "model_final.pth")]
    assert tasks[2][4][-4:] == ["TEST.EQLOSSES.CALIBRATION.METHOD", "norcal", "TEST.EQLOSSES.CALIBRATION.GAMMA", "0.3"]
    # a run with a result.json is done; a dependent run waits for its softmax run's result
    assert not train_methods.ready(loce, out)
    os.makedirs(os.path.join(out, "standard", "softmax", "seed0"))
    open(os.path.join(out, "standard", "softmax", "seed0", "result.json"), "w").close()
    assert train_methods.ready(loce, out)
    again = train_methods.schedule(["standard"], ["softmax", "loce"], [0], out)
    assert [(h, m, s) for h, m, s, _, _ in again] == [("standard", "loce", 0)]


def test_every_study_method_has_a_config():
    configs = train_methods.loss_configs()
    for method in ("softmax", "eqlv2", "seesaw", "gumbel", "federated", "softmax_eql", "loce", "norcal", "crt", "lws", "bags",
                   "copy_paste", "equilibrium", "pcb", "tde", "vmf", "cdb_w", *train_methods.ONE_STAGE):
        assert os.path.isfile(configs[method]), method
    assert configs["norcal"] == configs["softmax"]


def test_time_limit_stops_running_runs_and_leaves_no_result(tmp_path):
    """--time-limit: a run still going is stopped with its loader workers, leaves no result.json,
    and nothing is merged (train_methods.py as tools/study_gpu.sh runs it)."""
    import subprocess

    out, results = tmp_path / "runs", tmp_path / "study.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_methods.py"), "--heads", "standard", "--losses", "softmax",
         "--seeds", "3", "--time-limit", "1", "--threads", "1", "--output-dir", str(out), "--results", str(results),
         "SOLVER.MAX_ITER", "100000"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "stopped at --time-limit: standard / softmax / seed 3" in proc.stdout
    assert not (out / "standard" / "softmax" / "seed3" / "result.json").exists()
    assert not results.exists()
    # the run's process group is gone (no orphaned data-loader workers writing on)
    log = out / "standard" / "softmax" / "seed3" / "stdout.log"
    size = log.stat().st_size
    import time

    time.sleep(2)
    assert log.stat().st_size == size


def test_rare_class_verdicts(tmp_path):
    data = study.load(_study(tmp_path))
    text = study.rare_class_verdicts(data, "standard", ["eqlv2", "seesaw"])
    # eqlv2's box and mask APr: +10.00 [+7.52, +12.48]; seesaw has one seed: not judged
    assert text == ("Generated from the file: APr above its baseline beyond the interval: eqlv2 (box +10.00, "
                    "mask +10.00); below it: none; within the interval on both box and mask APr: none.")
    assert study.format_head(data, "standard").endswith(text)


def test_study_gpu_script_sets_up_and_refuses_without_cuda(tmp_path):
    """tools/study_gpu.sh: the shared environment set-up (tools/gpu_env.sh) runs, then, without a
    GPU, one line and exit 1 before any run starts."""
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "study_gpu.sh")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "study_gpu: needs a CUDA GPU"
    assert proc.stdout.startswith("torch ")  # gpu_env.sh's import check printed its versions
    assert not (tmp_path / "gpu_study.json").exists()


def test_legacy_runs_show_until_the_study_runs_the_method(tmp_path):
    path = _study(tmp_path)
    data = study.load(path)
    data["legacy_runs"] = [
        {"head": "standard", "method": "pcb", "seed": 0, "legacy": True, "bbox": {"AP": 45.16, "APr": 29.85, "APc": 42.35, "APf": 60.78},
         "segm": {"AP": 50.36, "APr": 38.86, "APc": 45.27, "APf": 65.68}},
        {"head": "standard", "method": "eqlv2", "seed": 0, "legacy": True, "bbox": {"AP": 1.0, "APr": 1.0, "APc": 1.0, "APf": 1.0}},
        {"head": "cascade", "method": "softmax", "seed": 0, "legacy": True, "bbox": {"AP": 55.93, "APr": 23.25, "APc": 60.35, "APf": 76.76}},
    ]
    text = study.format_head(data, "standard")
    assert "| pcb | 0* | 45.16 | 29.85 | 42.35 | 60.78 | 50.36 | 38.86 | 45.27 | 65.68 |" in text
    assert "| eqlv2 | 0,1,2 | 42.00 ± 1.00 |" in text and "| eqlv2 | 0* |" not in text  # the study's runs win
    assert "| pcb | softmax |" not in text  # never paired
    assert "earlier single run" in text
    cascade = study.format_head(data, "cascade")
    assert "| softmax | 0* | 55.93 | 23.25 | 60.35 | 76.76 | - | - | - | - |" in cascade and "Paired" not in cascade
    assert set(study.readme_blocks(data)) == {"standard", "cascade"}
    # merging keeps the legacy records
    with open(path, "w") as f:
        json.dump(data, f)
    study.merge_run(path, "standard", "seesaw", 1, _result_json(tmp_path, "s1", (41.0, 25.0, 40.0, 60.0)))
    assert len(study.load(path)["legacy_runs"]) == 3


def test_box_classifiers_run_in_both_heads_and_data_methods_in_the_standard_one():
    assert train_methods.applies("tde", "cascade") and train_methods.applies("vmf", "standard")
    assert train_methods.applies("copy_paste", "standard") and not train_methods.applies("copy_paste", "cascade")
    assert not train_methods.applies("tde", "one_stage") and not train_methods.applies("efl_fcos", "standard")
