"""Sweeps: parallel jobs (joblib), the cluster launcher (submitit), Optuna's search, and the
summary every multirun leaves at its root. Real runs on tiny data, through the command line."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import compose, read_metrics, run_cli, run_main, tiny_overrides
from omegaconf import OmegaConf

from balatro_train import train as train_module
from balatro_train.sweep import write_summary

OPTUNA_PARAMS = {"optimizer.lr", "freeze", "scheduler"}


def sweep_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs/multirun").glob("*/*") if p.is_dir())


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name))


def summary_rows(sweep: Path) -> list[dict]:
    with (sweep / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def assert_complete_job(job: Path, epochs: int = 1) -> list[dict]:
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        ".hydra/hydra.yaml",
        "train.log",
        "split.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (job / name).is_file(), (job, name)
    assert list((job / "tb").rglob("events.out.tfevents.*")), job
    assert not (job / "error.txt").exists(), (job / "error.txt").read_text()
    rows = read_metrics(job)
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    return rows


def log_pids(job: Path) -> set[int]:
    """The process ids in the job's train.log, written with PID_LOG_FORMAT."""
    return {int(m[1]) for m in re.finditer(r"^\[pid (\d+)\]", (job / "train.log").read_text(), re.MULTILINE)}


PID_LOG_FORMAT = "hydra.job_logging.formatters.simple.format='[pid %(process)d] %(name)s %(levelname)s - %(message)s'"


def sweep_in_process(args: list[str], cwd: Path, monkeypatch, capsys):
    """`python -m balatro_train <args>` through its Hydra entry point in this process (the basic launcher and
    Optuna's run their jobs in it): what a subprocess would do, without its seconds of imports."""
    monkeypatch.chdir(cwd)
    result = run_main(train_module, args, monkeypatch, capsys)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def without(overrides: list[str], key: str) -> list[str]:
    return [o for o in overrides if not o.startswith(f"{key}=")]


def test_joblib_runs_a_2x2_sweep_two_jobs_at_a_time(dataset, tmp_path):
    data, root = dataset
    # with a data-loading worker process per job: a joblib (loky) worker must be able to start one
    result = run_cli(
        [
            "-m",
            "hydra/launcher=joblib",
            "optimizer=simple,group",
            "freeze=all,high",
            PID_LOG_FORMAT,
            *tiny_overrides(data, root),
            "trainer.epochs=1",
            "trainer.num_workers=1",
        ],
        cwd=tmp_path,
    )
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    [sweep] = sweep_dirs(tmp_path)
    jobs = job_dirs(sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    combinations = set()
    for job in jobs:
        assert_complete_job(job)
        overrides = yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        combinations.add(tuple(sorted(o for o in overrides if o.startswith(("optimizer=", "freeze=")))))
        launcher = yaml.safe_load((job / ".hydra/hydra.yaml").read_text())["hydra"]["launcher"]
        assert launcher["_target_"].endswith("JoblibLauncher") and launcher["n_jobs"] == 2
    assert len(combinations) == 4
    # each job ran in one process, and the jobs in more than one: joblib's workers (the basic launcher
    # runs every job in its own process). No timing: when each job runs is up to the machine's load.
    pids = [log_pids(job) for job in jobs]
    assert all(len(p) == 1 for p in pids), pids
    assert len(set().union(*pids)) >= 2, pids

    rows = summary_rows(sweep)
    assert sorted(r["job"] for r in rows) == ["0", "1", "2", "3"] and {r["status"] for r in rows} == {"ok"}
    losses = [float(r["best_val_loss"]) for r in rows]
    assert losses == sorted(losses)
    assert "4 jobs: 4 ok, 0 failed" in (sweep / "summary.md").read_text()


def test_launcher_and_search_configs_compose(tmp_path, monkeypatch, capsys):
    # joblib and Optuna together: the Optuna sweeper asks for as many trials at a time as joblib runs
    result = sweep_in_process(
        ["hydra/launcher=joblib", "hparams_search=optuna", "--cfg", "hydra", "--resolve"], tmp_path, monkeypatch, capsys
    )
    hydra = yaml.safe_load(result.stdout)["hydra"]
    assert hydra["launcher"]["_target_"] == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert hydra["launcher"]["n_jobs"] == 2 and hydra["launcher"]["backend"] == "loky"
    sweeper = hydra["sweeper"]
    assert sweeper["_target_"] == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper["direction"] == "minimize" and sweeper["n_trials"] == 20 and sweeper["n_jobs"] == 2
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler" and sweeper["sampler"]["seed"] == 42
    assert sweeper["params"] == {
        "optimizer.lr": "tag(log, interval(1e-5, 1e-2))",
        "freeze": "choice(all, high, mid, none)",
        "scheduler": "choice(warmup_cosine, cosine, plateau, step, none)",
    }
    assert hydra["callbacks"]["sweep_summary"]["_target_"] == "balatro_train.sweep.SweepSummary"

    # composed with the compose API: the --cfg above already showed that printing one runs nothing
    cfg = compose(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"], hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 1 and launcher["tasks_per_node"] == 1
    assert launcher["timeout_min"] > 0 and launcher["signal_delay_s"] > 0 and "max_num_timeout" in launcher
    assert not (tmp_path / "outputs").exists()  # nothing ran


def test_submitit_local_runs_one_job_to_completion(dataset, tmp_path):
    data, root = dataset
    run_cli(["-m", "hydra/launcher=submitit_local", *tiny_overrides(data, root), "trainer.epochs=1"], cwd=tmp_path)
    [sweep] = sweep_dirs(tmp_path)
    [job] = job_dirs(sweep)
    assert_complete_job(job)
    assert (sweep / ".submitit").is_dir()  # the job ran through submitit, in its own process
    [row] = summary_rows(sweep)
    assert row["status"] == "ok" and row["best_epoch"] == "1"


def test_optuna_search_completes_and_reports_its_best_trial(dataset, tmp_path, monkeypatch, capsys):
    data, root = dataset
    overrides = without(tiny_overrides(data, root), "optimizer.lr")  # searched, not fixed
    sweep_in_process(
        ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", *overrides, "trainer.epochs=1"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    [sweep] = sweep_dirs(tmp_path)
    jobs = job_dirs(sweep)
    assert len(jobs) == 3
    returned = {}
    for job in jobs:
        rows = assert_complete_job(job)
        params = dict(
            o.split("=", 1)
            for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
            if o.split("=", 1)[0] in OPTUNA_PARAMS
        )
        assert set(params) == OPTUNA_PARAMS
        assert 1e-5 <= float(params["optimizer.lr"]) <= 1e-2
        assert params["freeze"] in {"all", "high", "mid", "none"}
        assert params["scheduler"] in {"warmup_cosine", "cosine", "plateau", "step", "none"}
        returned[job.name] = min(r["val_loss"] for r in rows)  # what the task function returned

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == OPTUNA_PARAMS
    assert results["best_value"] == pytest.approx(min(returned.values()))
    rows = summary_rows(sweep)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert rows[0]["job"] == min(returned, key=returned.get)
    assert float(rows[0]["best_val_loss"]) == pytest.approx(results["best_value"])
    assert "Optuna's best trial" in (sweep / "summary.md").read_text()


@pytest.mark.parametrize("sweeper", ["basic", "optuna"])
def test_a_failed_job_is_a_failed_row_and_the_sweep_goes_on(dataset, tmp_path, sweeper, monkeypatch, capsys):
    data, root = dataset
    overrides = [*without(tiny_overrides(data, root), "optimizer.lr"), "trainer.epochs=1"]
    if sweeper == "basic":
        args = ["-m", "optimizer.lr=1e-3,1e30", *overrides]
    else:  # the sampler's seed makes the two trials one of each
        args = [
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "optimizer.lr=choice(1e-3,1e30)",
            "freeze=none",
            "scheduler=none",
            *overrides,
        ]
    result = sweep_in_process(args, tmp_path, monkeypatch, capsys)
    assert "1 of 2 sweep jobs failed" in result.stdout + result.stderr
    [sweep] = sweep_dirs(tmp_path)
    rows = summary_rows(sweep)
    assert [r["status"] for r in rows] == ["ok", "failed"]
    ok, failed = rows
    assert "optimizer.lr=0.001" in ok["overrides"].split()
    [best] = read_metrics(sweep / ok["job"])  # one epoch
    assert float(ok["best_val_loss"]) == best["val_loss"] and ok["best_epoch"] == "1"
    for task in ("identification", "modifier"):
        assert float(ok[f"{task}/top1_acc"]) == best[f"{task}/top1_acc"]
    assert "optimizer.lr=1e+30" in failed["overrides"].split()
    assert "the loss became nan" in failed["error"]
    assert failed["error"] == (sweep / failed["job"] / "error.txt").read_text().strip()
    assert failed["best_val_loss"] == "" and failed["best_epoch"] == ""
    md = (sweep / "summary.md").read_text()
    assert "2 jobs: 1 ok, 1 failed" in md and "the loss became nan" in md
    if sweeper == "optuna":
        results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
        assert results["best_params"] == {"optimizer.lr": 0.001}


def test_summary_orders_jobs_and_tells_killed_from_early_stopped(tmp_path):
    """The summary of job folders as the runner leaves them, including ones it could not finish."""

    def job(name, overrides, losses=(), epochs=5, patience=2, error=None, cut_short=False):
        folder = tmp_path / name
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
        trainer = {"epochs": epochs, "patience": patience}
        (folder / ".hydra/config.yaml").write_text(yaml.safe_dump({"trainer": trainer}))
        rows = [
            {"epoch": i + 1, "val_loss": v, "a/top1_acc": 0.1 * (i + 1), "b/top1_acc": 0.5}
            for i, v in enumerate(losses)
        ]
        lines = [json.dumps(r) + "\n" for r in rows] + (['{"epoch": 9, "val'] if cut_short else [])
        (folder / "metrics.jsonl").write_text("".join(lines))
        if error:
            (folder / "error.txt").write_text(error + "\nsecond line\n")

    job("2", ["lr=2", "x=1"], [0.9, 0.7, 0.8, 0.75, 0.72], cut_short=True)  # finished; a line cut short
    job("10", ["lr=10", "x=1"], [0.5, 0.6, 0.6])  # stopped early: 2 epochs without a better loss
    job("9", ["lr=9", "x=1"], [0.4], error="UserError: it broke")  # failed, with its error
    job("3", ["lr=3", "x=1"], [0.6, 0.3])  # 2 of 5 epochs and no error: killed
    job("4", ["lr=4", "x=1"])  # not one epoch
    jobs = write_summary(tmp_path)

    assert [(j.job, j.status) for j in jobs] == [
        ("10", "ok"),
        ("2", "ok"),
        ("3", "failed"),
        ("4", "failed"),
        ("9", "failed"),
    ]
    assert (jobs[0].best_epoch, jobs[0].best_val_loss, jobs[0].top1) == (1, 0.5, {"a/top1_acc": 0.1, "b/top1_acc": 0.5})
    assert (jobs[1].best_epoch, jobs[1].epochs) == (2, 5)
    assert jobs[2].error == "stopped after epoch 2 of 5 without an error (interrupted or killed)"
    assert "no finished epoch" in jobs[3].error
    assert jobs[4].error == "UserError: it broke" and jobs[4].best_val_loss == 0.4
    rows = summary_rows(tmp_path)
    assert list(rows[0]) == [
        "job",
        "status",
        "best_epoch",
        "epochs",
        "best_val_loss",
        "a/top1_acc",
        "b/top1_acc",
        "overrides",
        "error",
    ]
    assert rows[0]["overrides"] == "lr=10 x=1"
    md = (tmp_path / "summary.md").read_text()
    assert "5 jobs: 2 ok, 3 failed" in md and "Overrides of every job: `x=1`" in md
    assert "| 10 | ok | 1 | 3 | 0.5000 | 0.1000 | 0.5000 | `lr=10` |  |" in md

    # the same, by hand, for a sweep that did not get to its end
    (tmp_path / "summary.md").unlink()
    run_cli([str(tmp_path)], cwd=tmp_path, module="balatro_train.sweep")
    assert (tmp_path / "summary.md").read_text() == md
