"""Config loading: strict keys with suggestions, types, values, all problems at once, exit code 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from peftkit.cli import main
from peftkit.config import dump_config, load_config
from peftkit.errors import ConfigError
from tests.helpers import REPO


def _cfg(tmp_path: Path, alpaca_file: Path, extra: str = "") -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  train: {alpaca_file}\ntrain:\n  output_dir: {tmp_path / 'out'}\n{extra}")
    return path


def _issues(path: Path | None, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return e.value.issues


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    if "deepspeed" in example.read_text() and importlib.util.find_spec("deepspeed") is None:
        assert _issues(example) == ["train.deepspeed: the deepspeed package is not installed (pip install deepspeed)"]
        return
    import yaml

    start = (yaml.safe_load(example.read_text()).get("finetuning") or {}).get("adapter_name_or_path")
    overrides = []
    if start:  # goes on from another example's run (grpo from the sft demo), which this test does not train
        outputs = {yaml.safe_load(e.read_text())["train"]["output_dir"] for e in (REPO / "examples").glob("*.yaml")}
        assert start in outputs
        overrides = ["finetuning.adapter_name_or_path=null"]
    if "data/image_demo/" in example.read_text():  # made by `make image-demo` (scripts/make_image_data.py): a few here
        import subprocess
        import sys
        import tempfile

        made = Path(tempfile.mkdtemp())
        subprocess.run([sys.executable, "scripts/make_image_data.py", str(made), "--train", "4", "--dev", "2"], check=True)
        overrides += [f"data.train={made / 'train.jsonl'}", f"eval.dataset={made / 'dev.jsonl'}"]
    cfg = load_config(example, overrides)
    assert cfg.train["output_dir"].startswith("outputs/")
    assert cfg.data.train


def test_required_examples_exist() -> None:
    assert (REPO / "examples/resume_ner_lora.yaml").is_file()
    assert (REPO / "examples/alpaca_lora_sft.yaml").is_file()


def test_overrides_are_typed(tmp_path: Path, alpaca_file: Path) -> None:
    cfg = load_config(_cfg(tmp_path, alpaca_file), ["train.max_steps=2", "train.learning_rate=1e-4",
                                                      "finetuning.lora_target=[q_proj, v_proj]", "model.dtype=bfloat16"])
    assert cfg.train["max_steps"] == 2
    assert cfg.train["learning_rate"] == pytest.approx(1e-4)
    assert cfg.finetuning.lora_target == ["q_proj", "v_proj"]
    assert cfg.model.dtype == "bfloat16"


def test_model_shorthand(tmp_path: Path, alpaca_file: Path) -> None:
    cfg = load_config(_cfg(tmp_path, alpaca_file, "model: /some/folder\n"))
    assert cfg.model.name_or_path == "/some/folder"


def test_unknown_key_suggests_closest(tmp_path: Path, alpaca_file: Path) -> None:
    (issue,) = _issues(_cfg(tmp_path, alpaca_file, "finetuning:\n  lora_rnk: 8\n"))
    assert issue.startswith("finetuning.lora_rnk: unknown key; did you mean lora_rank,")  # closest first


def test_unknown_training_argument_suggests_closest(tmp_path: Path, alpaca_file: Path) -> None:
    (issue,) = _issues(_cfg(tmp_path, alpaca_file), ["train.learning_rat=0.1"])
    assert issue.startswith("train.learning_rat: not a Seq2SeqTrainingArguments field; did you mean learning_rate")


def test_unknown_section(tmp_path: Path, alpaca_file: Path) -> None:
    (issue,) = _issues(_cfg(tmp_path, alpaca_file, "fintuning:\n  lora_rank: 8\n"))
    assert issue == "unknown section 'fintuning'; did you mean finetuning?"


def test_wrong_type(tmp_path: Path, alpaca_file: Path) -> None:
    (issue,) = _issues(_cfg(tmp_path, alpaca_file), ["finetuning.lora_rank=eight"])
    assert issue == "finetuning.lora_rank='eight': must be an integer"


def test_wrong_type_in_training_arguments(tmp_path: Path, alpaca_file: Path) -> None:
    (issue,) = _issues(_cfg(tmp_path, alpaca_file), ["train.num_train_epochs=three"])
    assert issue == "train.num_train_epochs='three': must be a number"


def test_impossible_values(tmp_path: Path, alpaca_file: Path) -> None:
    issues = _issues(_cfg(tmp_path, alpaca_file), ["finetuning.lora_rank=0", "data.cutoff_len=0"])
    assert any(i.startswith("data.cutoff_len=0: must be at least 1") for i in issues)
    assert any(i.startswith("finetuning.lora_rank=0: must be at least 1") for i in issues)


def test_missing_data_file(tmp_path: Path, alpaca_file: Path) -> None:
    (issue,) = _issues(_cfg(tmp_path, alpaca_file), [f"data.train={tmp_path / 'nope.json'}"])
    assert issue.startswith(f"data.train: '{tmp_path / 'nope.json'}' does not exist")


def test_unknown_template_is_reported_with_the_rest(tmp_path: Path, alpaca_file: Path) -> None:
    issues = _issues(_cfg(tmp_path, alpaca_file), ["data.template=vicuna", "finetuning.lora_rank=0"])
    assert issues[0].startswith("data.template='vicuna': neither a shipped template (alpaca, chatml, llama3, yuan2)")
    assert len(issues) == 2


def test_override_that_is_not_yaml_is_checked_as_text(tmp_path: Path, alpaca_file: Path) -> None:
    (issue,) = _issues(_cfg(tmp_path, alpaca_file), ["finetuning.lora_rank=[8"])
    assert issue == "finetuning.lora_rank='[8': must be an integer"


def test_literal_choices(tmp_path: Path, alpaca_file: Path) -> None:
    (issue,) = _issues(_cfg(tmp_path, alpaca_file), ["finetuning.finetuning_type=qlora"])
    assert issue == "finetuning.finetuning_type='qlora': must be one of lora, freeze, full"


def test_all_problems_reported_at_once(tmp_path: Path, alpaca_file: Path) -> None:
    issues = _issues(_cfg(tmp_path, alpaca_file, "finetuning:\n  lora_rnk: 8\n"),
                     ["train.learning_rat=1", "model.dtype=float64", "data.format=csv"])
    assert len(issues) == 4


def test_transformers_cross_checks_are_reported(tmp_path: Path, alpaca_file: Path) -> None:
    issues = _issues(_cfg(tmp_path, alpaca_file), ["train.load_best_model_at_end=true",
                                                    "train.eval_strategy=steps", "train.save_strategy=epoch"])
    assert issues[0].startswith("train.eval_strategy=steps: there is nothing to evaluate on")
    assert issues[1].startswith("train: transformers rejected these TrainingArguments:")


def test_lifecycle_keys_are_checked(tmp_path: Path, alpaca_file: Path) -> None:
    issues = _issues(_cfg(tmp_path, alpaca_file), ["train.early_stopping_patience=2", "train.save_strategy=false"])
    assert issues == ["train.early_stopping_patience: needs evaluations — set train.eval_strategy (steps or epoch) "
                      "and data.eval or data.val_size"]
    issues = _issues(_cfg(tmp_path, alpaca_file), ["train.deepspeed=examples/deepspeed_zero2.json"])
    assert issues == ["train.deepspeed: the deepspeed package is not installed (pip install deepspeed)"]
    cfg = load_config(_cfg(tmp_path, alpaca_file), ["train.resume_from_checkpoint=true", "train.save_strategy=no"])
    assert cfg.train["resume_from_checkpoint"] is True and cfg.train["save_strategy"] == "no"
    for bad, issue in (("0", "0.0: a number of minutes above 0 (or leave it out)"), ("-3", "-3.0: a number of "
                       "minutes above 0 (or leave it out)"), ("soon", "'soon': must be a number")):
        assert _issues(_cfg(tmp_path, alpaca_file), [f"train.max_train_minutes={bad}"]) == [
            f"train.max_train_minutes={issue}"]
    assert load_config(_cfg(tmp_path, alpaca_file), ["train.max_train_minutes=7.5"]).train["max_train_minutes"] == 7.5


def test_resolved_config_round_trips(tmp_path: Path, alpaca_file: Path) -> None:
    cfg = load_config(_cfg(tmp_path, alpaca_file), ["train.max_steps=3"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    data = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert data["finetuning"]["lora_rank"] == 8  # defaults are spelled out
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(("forced", "bf16"), [("0", False), ("1", True)])
def test_bf16_auto_follows_the_cpu_switch(tmp_path: Path, alpaca_file: Path, monkeypatch: pytest.MonkeyPatch,
                                          forced: str, bf16: bool) -> None:
    """$PEFTKIT_CPU_BF16 makes either kind of CPU resolve `bf16: auto` as the other does (README "Tests")."""
    monkeypatch.setenv("PEFTKIT_CPU_BF16", forced)
    assert load_config(_cfg(tmp_path, alpaca_file, "  bf16: auto\n")).train["bf16"] is bf16


def test_bf16_cpu_switch_with_another_value_is_a_config_error(tmp_path: Path, alpaca_file: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTKIT_CPU_BF16", "yes")
    assert _issues(_cfg(tmp_path, alpaca_file, "  bf16: auto\n")) == [
        "$PEFTKIT_CPU_BF16='yes': must be 0 or 1 (what train.bf16: auto means on this CPU), or unset to follow the "
        "CPU's flags"]


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: Path, alpaca_file: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", str(_cfg(tmp_path, alpaca_file)), "finetuning.lora_rank=0", "train.learning_rat=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "invalid config (2 problems)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written before the config is valid


def test_cli_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gradient_checkpointing_is_passed_under_its_current_name(tmp_path: Path) -> None:
    """transformers 5.24 renamed it activation_checkpointing (the old name warns on every run); peftkit passes the
    users' familiar key under the new name, and QLoRA's default too."""
    import warnings

    from peftkit.config.load import build_training_arguments

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = build_training_arguments({"output_dir": str(tmp_path), "gradient_checkpointing": True})
        qlora = build_training_arguments({"output_dir": str(tmp_path)}, quantized=True)
    assert not [w for w in caught if "checkpointing" in str(w.message)]
    assert written.gradient_checkpointing is True and qlora.gradient_checkpointing is True


def test_importing_peftkit_and_peft_prints_no_bitsandbytes_kernels_line() -> None:
    """On a CPU with AVX512-BF16, bitsandbytes logs a kernels-community line at import (peftkit/libraries.py)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import peftkit, peft, bitsandbytes"], capture_output=True, text=True,
                          check=True)
    assert "kernels-community" not in done.stderr + done.stdout
