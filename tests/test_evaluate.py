"""The eval stage: the pass@1 / pass@k / maj@k arithmetic on constructed records, and one real
`r1-grpo eval` run that writes predictions.jsonl, metrics.json and the eval manifest."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from trainer import evaluate
from trainer.contract import output as contract
from trainer.r1.format import check_format, extract_answer
from trainer.r1.rewards import answers_equal, reward_function
from trainer.r1.scoring import majority_answer, summarize


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ([], None),
        ([None, None], None),
        (["12", None, " 12 ", "7"], "12"),
        (["7", "12"], "7"),  # a tie goes to the earliest
        (["9", "7", "12", "7", "12"], "7"),  # tie between 7 and 12: 7 came first
        (["$5$", "5.", "6"], "$5$"),  # "$5$" and "5." normalise to the same answer
        (["1,000", "1000", "999"], "1,000"),
        ([None, "3"], "3"),
    ],
)
def test_majority_answer(answers: list, expected: str | None) -> None:
    assert majority_answer(answers) == expected


def _record(
    rewards: list[float],
    fmt: list[bool],
    tokens: list[int],
    truncated: list[bool],
    k: int,
    majority_correct: bool,
) -> dict:
    correct = [r == 10.0 for r in rewards]
    return {
        "rewards": rewards,
        "format_ok": fmt,
        "completion_tokens": tokens,
        "truncated": truncated,
        "pass@1": sum(correct) / k,
        f"pass@{k}": float(any(correct)),
        f"maj@{k}": float(majority_correct),
    }


def test_summarize_single_sample() -> None:
    records = [
        _record([10.0], [True], [20], [False], 1, True),
        _record([0.0], [False], [64], [True], 1, False),
    ]
    m = summarize(records, 1)
    assert m == {
        "num_problems": 2.0,
        "accuracy": 0.5,
        "pass@1": 0.5,
        "format_rate": 0.5,
        "mean_reward": 5.0,
        "mean_completion_tokens": 42.0,
        "truncated_rate": 0.5,
    }


def test_summarize_k_samples() -> None:
    k = 4
    records = [
        # 2 of 4 right, majority right
        _record(
            [10.0, 10.0, 1.0, 0.0],
            [True, True, True, False],
            [10, 12, 14, 64],
            [False, False, False, True],
            k,
            True,
        ),
        # 1 of 4 right, majority wrong
        _record([1.0, 1.0, 10.0, 1.0], [True] * 4, [8, 8, 8, 8], [False] * 4, k, False),
        # none right
        _record([0.0] * 4, [False] * 4, [64] * 4, [True] * 4, k, False),
    ]
    m = summarize(records, k)
    assert m["num_problems"] == 3.0
    assert m["pass@1"] == m["accuracy"] == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx(1 / 3)
    assert m["format_rate"] == pytest.approx(7 / 12)
    assert m["mean_reward"] == pytest.approx(34.0 / 12)
    assert m["mean_completion_tokens"] == pytest.approx((100 + 32 + 256) / 12)
    assert m["truncated_rate"] == pytest.approx(5 / 12)


def test_summarize_nothing() -> None:
    assert summarize([], 4) == {
        "num_problems": 0.0,
        "accuracy": 0.0,
        "pass@1": 0.0,
        "format_rate": 0.0,
        "mean_reward": 0.0,
        "mean_completion_tokens": 0.0,
        "truncated_rate": 0.0,
        "pass@4": 0.0,
        "maj@4": 0.0,
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num_samples_per_problem", "4"], "--num_samples_per_problem > 1 needs --temperature > 0"),
        (["--num_samples_per_problem", "0"], "--num_samples_per_problem must be >= 1"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--max_completion_length", "0"], "--inference_batch_size and --max_completion_length must be >= 1"),
        (["--report_to", "tensorboard"], "--report_to 'tensorboard': expected one of none, jsonl, wandb"),
    ],
)
def test_bad_flag_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = [
        "--model_name_or_path",
        "m",
        "--dataset_name",
        "d.jsonl",
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]
    assert evaluate.main(argv) == 2
    assert f"r1-grpo eval: error: {message}" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# A real run


K = 4
N_PROBLEMS = 6


@pytest.fixture(scope="module")
def eval_run(warm_model_dir: Path, arith_jsonl: Path, stage_runner, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("eval") / "eval"
    result = stage_runner.run_script(
        "r1-grpo",
        [
            "eval",
            "--model_name_or_path",
            str(warm_model_dir),
            "--dataset_name",
            str(arith_jsonl),
            "--output_dir",
            str(out),
            "--max_eval_samples",
            str(N_PROBLEMS),
            "--num_samples_per_problem",
            str(K),
            "--temperature",
            "1.0",
            "--max_completion_length",
            "24",
            "--inference_batch_size",
            "4",
            "--seed",
            "3",
        ],
    )
    assert result.returncode == 0, result.describe()
    return out


def test_eval_run_writes_predictions_metrics_and_manifest(
    eval_run: Path, arith_jsonl: Path, warm_model_dir: Path
) -> None:
    out = eval_run
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.jsonl", "r1_stage.json"]
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p

    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in arith_jsonl.read_text().splitlines()][:N_PROBLEMS]
    assert [r["problem"] for r in records] == [row["question"] for row in rows]  # dataset order
    assert [r["answer"] for r in records] == [row["answer"] for row in rows]
    for rec in records:
        texts = rec["completions"]
        assert len(texts) == K
        assert rec["rewards"] == [reward_function(t, rec["answer"]) for t in texts]
        assert rec["format_ok"] == [check_format(t) for t in texts]
        correct = [r == 10.0 for r in rec["rewards"]]
        assert rec["pass@1"] == sum(correct) / K and rec[f"pass@{K}"] == float(any(correct))
        majority = majority_answer([extract_answer(t) for t in texts])
        assert rec[f"maj@{K}"] == float(majority is not None and answers_equal(majority, rec["answer"]))
        assert all(1 <= n <= 24 for n in rec["completion_tokens"])
        assert all(n == 24 for n, tr in zip(rec["completion_tokens"], rec["truncated"], strict=True) if tr)
    assert any(any(rec["format_ok"]) for rec in records), (
        "the warm model should write the R1 format sometimes"
    )

    metrics = json.loads((out / "metrics.json").read_text())
    expected = summarize(records, K)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert metrics["num_problems"] == N_PROBLEMS and metrics["skipped_rows"] == 0.0
    assert {f"pass@{K}", f"maj@{K}"} <= set(metrics)

    manifest = contract.verify_stage_output(out, "eval")
    assert manifest.weights == {} and manifest.steps == 0
    assert manifest.metrics == metrics
    assert manifest.inputs["model_name_or_path"] == str(warm_model_dir) and manifest.inputs["split"] == "test"
    assert manifest.inputs["args"]["num_samples_per_problem"] == K


def test_eval_on_a_problem_answer_file_reports_pass_at_1_and_maj_at_k(
    warm_model_dir: Path, stage_runner, tmp_path: Path
) -> None:
    """`r1-grpo eval` on an evaluation set with a problem and a final answer only (no worked solution), in
    the shape of AI-MO/aimo-validation-amc: id, problem, answer stored as a float, url; mixed with a second
    dataset read in one of its configs (`<folder>@<config>`: a local dataset folder whose README declares
    two configs stands in for a hub set, which cannot be reached here), so every metric comes per dataset
    as well as over both."""
    import datasets

    pairs = [(1, 2), (3, 4), (5, 2), (2, 6), (4, 4), (7, 1)]
    rows = [
        {"id": i, "problem": f"Compute {a} + {b}.", "answer": float(a + b), "url": f"https://example.org/{i}"}
        for i, (a, b) in enumerate(pairs)
    ]
    path = tmp_path / "amc.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    other = tmp_path / "sums"
    for config, config_pairs in (("easy", [(1, 1), (2, 1), (3, 1)]), ("hard", [(40, 2)])):
        (other / config).mkdir(parents=True)
        lines = [
            json.dumps({"question": f"Compute {a} + {b}.", "answer": str(a + b)}) for a, b in config_pairs
        ]
        (other / config / "test.jsonl").write_text("\n".join(lines) + "\n")
    configs = "".join(
        f"- config_name: {c}\n  data_files:\n  - split: test\n    path: {c}/test.jsonl\n"
        for c in ("easy", "hard")
    )
    (other / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    out = tmp_path / "eval"
    argv = ["eval", "--model_name_or_path", str(warm_model_dir), "--dataset_name", f"{path},{other}@easy"]
    argv += ["--output_dir", str(out), "--num_samples_per_problem", str(K), "--temperature", "1.0"]
    argv += ["--max_completion_length", "24", "--inference_batch_size", "8", "--seed", "5"]
    result = stage_runner.run_script("r1-grpo", argv)
    assert result.returncode == 0, result.describe()
    assert f"{path}:test: problem_answer schema: problem='problem', answer='answer'" in result.output

    everything = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    records = everything[: len(pairs)]
    assert [r["answer"] for r in everything] == [str(a + b) for a, b in pairs] + ["2", "3", "4"]  # easy only
    assert [r["dataset"] for r in everything] == [str(path)] * len(pairs) + [f"{other}@easy"] * 3
    for rec in records:
        texts = rec["completions"]
        assert len(texts) == K and rec["rewards"] == [reward_function(t, rec["answer"]) for t in texts]
        assert rec["pass@1"] == sum(r == 10.0 for r in rec["rewards"]) / K
        majority = majority_answer([extract_answer(t) for t in texts])
        assert rec[f"maj@{K}"] == float(majority is not None and answers_equal(majority, rec["answer"]))
    assert any(any(rec["format_ok"]) for rec in records)
    metrics = json.loads((out / "metrics.json").read_text())
    expected = summarize(everything, K)  # over all problems, each counted once
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert {"pass@1", f"pass@{K}", f"maj@{K}"} <= set(metrics) and metrics["num_problems"] == len(pairs) + 3
    for name, part in ((str(path), records), (f"{other}@easy", everything[len(pairs) :])):
        expected = summarize(part, K)
        assert {f"{k}/{name}": metrics[f"{k}/{name}"] for k in expected} == pytest.approx(
            {f"{k}/{name}": v for k, v in expected.items()}
        )
        assert metrics[f"skipped_rows/{name}"] == 0.0
    # overall and per dataset, each with skipped_rows; and runtime_s
    assert len(metrics) == 3 * (len(expected) + 1) + 1
    assert contract.verify_stage_output(out, "eval").metrics == metrics
