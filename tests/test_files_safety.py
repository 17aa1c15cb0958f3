"""No command deletes what mogu did not write: each data-loss case leaves the user's files intact and
exits non-zero with one line; mogu's own folders (marked) are still replaced, as resume and re-runs need."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import _assert_clean_error as one_line_error
from test_cli import mogu

from mogu import MoGUConfig, MoGUModel
from mogu.io import MARKER_FILE, RefusedOverwriteError, atomic_directory, check_replaceable, folder_kind
from tiny_models import randomize_added, tiny_model, tiny_tokenizer


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.md").write_text("my notes")
    (path / "results").mkdir()
    (path / "results" / "table.csv").write_text("a,b\n1,2\n")
    return path


def intact(path: Path) -> bool:
    return ((path / "notes.md").read_text() == "my notes"
            and (path / "results" / "table.csv").read_text() == "a,b\n1,2\n")


@pytest.fixture()
def checkpoint(tmp_path):
    base_dir = tmp_path / "project" / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = MoGUModel.from_base(str(base_dir), MoGUConfig())
    randomize_added(model)
    return model, model.save_pretrained(tmp_path / "project" / "ckpt")


def test_calibrate_refuses_a_folder_of_user_files_and_leaves_it_intact(tmp_path, checkpoint):
    _, ckpt = checkpoint
    notes = user_folder(tmp_path / "notes")
    one_line_error(mogu("calibrate", "--model", str(ckpt), "--out", str(notes)), "--overwrite")
    assert intact(notes)


@pytest.mark.parametrize("where", ["cwd", "home", "root"])
def test_calibrate_never_writes_over_the_current_home_or_root_folder(tmp_path, checkpoint, where):
    _, ckpt = checkpoint
    cwd = user_folder(tmp_path / "work")
    out = {"cwd": ".", "home": str(Path.home()), "root": "/"}[where]
    for extra in ([], ["--overwrite"]):  # not even with --overwrite
        result = mogu("calibrate", "--model", str(ckpt), "--out", out, *extra, cwd=cwd)
        one_line_error(result, "refusing to write")
    assert intact(cwd)


def test_calibrate_never_writes_over_the_folder_that_holds_its_model(tmp_path, checkpoint):
    _, ckpt = checkpoint
    project = ckpt.parent
    (project / "notes.md").write_text("my notes")
    one_line_error(mogu("calibrate", "--model", str(ckpt), "--out", str(project), "--overwrite"), "an input")
    assert (ckpt / "mogu_config.json").is_file() and (project / "notes.md").read_text() == "my notes"


def test_export_does_not_replace_another_checkpoint(tmp_path, checkpoint):
    model, ckpt = checkpoint
    other = model.save_pretrained(tmp_path / "other")
    before = sorted(p.name for p in other.iterdir())
    one_line_error(mogu("export", "--model", str(ckpt), "--out", str(other)), "holds a mogu checkpoint")
    assert sorted(p.name for p in other.iterdir()) == before and (other / "router.safetensors").is_file()
    # An earlier export is replaced (the same kind of artefact), so a re-run works.
    first = mogu("export", "--model", str(ckpt), "--out", str(tmp_path / "exported"))
    assert first.returncode == 0, first.stderr
    again = mogu("export", "--model", str(ckpt), "--out", str(tmp_path / "exported"))
    assert again.returncode == 0, again.stderr
    assert folder_kind(tmp_path / "exported") == "adapters"


def test_train_refuses_a_user_folder_as_its_model_folder_before_training(tmp_path):
    run = tmp_path / "run"
    user_folder(run / "model")
    result = mogu("train", "--data", str(tmp_path / "data"), "--out", str(run))
    one_line_error(result, "refusing to replace")
    assert intact(run / "model")


def test_save_pretrained_follows_the_same_rule_with_overwrite(tmp_path, checkpoint):
    model, ckpt = checkpoint
    notes = user_folder(tmp_path / "notes")
    with pytest.raises(RefusedOverwriteError, match="overwrite=True"):
        model.save_pretrained(notes)
    assert intact(notes)
    model.save_pretrained(ckpt)  # its own checkpoint: replaced in one rename
    assert folder_kind(ckpt) == "checkpoint"
    model.save_pretrained(notes, overwrite=True)
    assert not (notes / "notes.md").exists() and folder_kind(notes) == "checkpoint"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RefusedOverwriteError, match="is a file"):
        model.save_pretrained(tmp_path / "a-file", overwrite=True)


def test_a_checkpoint_saved_before_the_marker_is_still_mogu_s(tmp_path, checkpoint):
    model, ckpt = checkpoint
    (ckpt / MARKER_FILE).unlink()
    assert folder_kind(ckpt) == "checkpoint"  # recognised by mogu_config.json's format_version
    model.save_pretrained(ckpt)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "mogu_config.json").write_text(json.dumps({"r": 8}))  # not written by mogu: no format_version
    assert folder_kind(fake) is None


def test_empty_and_missing_folders_are_writable_and_a_failed_write_leaves_the_old_one(tmp_path):
    check_replaceable(tmp_path / "missing", kind="checkpoint")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", kind="checkpoint")
    with atomic_directory(tmp_path / "mine", kind="adapter") as tmp:
        (tmp / "w.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "mine", kind="adapter") as tmp:
            (tmp / "w.txt").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (tmp_path / "mine" / "w.txt").read_text() == "1"
    with pytest.raises(RefusedOverwriteError, match="holds a mogu adapter, not a checkpoint"):
        check_replaceable(tmp_path / "mine", kind="checkpoint")


def test_an_unknown_stage_name_is_an_error_not_a_silent_skip(tmp_path):
    one_line_error(mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--stages", "glad,routr"),
                   "unknown stage(s) 'routr'")


def test_an_unknown_checkpoint_format_version_names_the_one_mogu_reads(tmp_path, checkpoint):
    from mogu.errors import CheckpointMismatchError

    _, ckpt = checkpoint
    config = json.loads((ckpt / "mogu_config.json").read_text())
    (ckpt / "mogu_config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointMismatchError, match="format_version 99; this mogu reads format_version 1"):
        MoGUModel.from_pretrained(ckpt)


def test_bad_numbers_and_a_file_as_eval_out_are_one_line_errors(tmp_path, checkpoint):
    _, ckpt = checkpoint
    one_line_error(mogu("generate", "--model", str(ckpt), "--prompt", "hi", "--route-tokens", "-1"), "--route-tokens")
    one_line_error(mogu("generate", "--model", str(ckpt), "--prompt", "hi", "--threads", "-1"), "--threads")
    (tmp_path / "out.txt").write_text("keep me")
    one_line_error(mogu("eval", "--model", str(ckpt), "--out", str(tmp_path / "out.txt")), "is a file")
    assert (tmp_path / "out.txt").read_text() == "keep me"


def test_an_unfitted_prompt_gate_is_an_error_at_generate_save_and_train(tmp_path):
    import torch

    from mogu.errors import MoGUError

    model = MoGUModel.from_base(tiny_model("llama"), MoGUConfig(router_type="prompt"), tokenizer=tiny_tokenizer())
    x = torch.tensor([[5, 6, 7]])
    with pytest.raises(MoGUError, match="fit_gate"):
        model.generate(input_ids=x, max_new_tokens=2)
    with pytest.raises(MoGUError, match="never fitted"):
        model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    one_line_error(mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--router-type", "prompt",
                        "--stages", "glad,unwill"), "add router to --stages")


def test_routers_over_untrained_experts_are_refused_without_a_resume_or_a_checkpoint(tmp_path):
    one_line_error(mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--stages", "router"),
                   "--stages without glad and unwill: the routers would be trained over a fresh, untrained expert")
    one_line_error(mogu("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--stages", "glad,router"),
                   "--stages without unwill")


def test_train_refuses_a_run_folder_of_user_files_and_its_own_data_folder(tmp_path):
    """A fresh run replaces run.json and metrics.jsonl and deletes stage and checkpoint folders in --out: a
    folder of the user's files, or the data folder the run reads, is refused before anything is written."""
    run = user_folder(tmp_path / "run")
    one_line_error(mogu("train", "--data", str(tmp_path / "data"), "--out", str(run)), "holds files mogu did not write")
    assert intact(run) and not (run / "run.json").exists()
    data = user_folder(tmp_path / "data")
    one_line_error(mogu("train", "--data", str(data), "--out", str(data)), "an input of this command")
    assert intact(data)


def test_data_task_refuses_a_folder_holding_the_users_own_train_file(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_text('{"prompt": "mine", "response": "x"}\n')
    one_line_error(mogu("data", "task", "--name", "arith", "--out", str(mine)), "holds files mogu did not write")
    assert (mine / "train.jsonl").read_text() == '{"prompt": "mine", "response": "x"}\n'
    # mogu's own task folder is rewritten (same seed, same files), and marked as a run folder
    ours = tmp_path / "ours"
    for _ in range(2):
        assert mogu("data", "task", "--name", "arith", "--out", str(ours), "--train", "4", "--test", "2").returncode == 0
    assert folder_kind(ours) == "run folder" and len((ours / "train.jsonl").read_text().splitlines()) == 4


def test_finetune_refuses_a_run_folder_whose_checkpoints_mogu_did_not_write(tmp_path, checkpoint):
    _, ckpt = checkpoint
    task = tmp_path / "task"
    assert mogu("data", "task", "--name", "arith", "--out", str(task), "--train", "4", "--test", "2").returncode == 0
    out = tmp_path / "ft"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "epoch=9.ckpt").write_text("someone else's checkpoint")
    one_line_error(mogu("finetune", "--model", str(ckpt), "--task-data", str(task), "--out", str(out)),
                   "holds files mogu did not write")
    assert (out / "checkpoints" / "epoch=9.ckpt").read_text() == "someone else's checkpoint"
    one_line_error(mogu("finetune", "--model", str(ckpt), "--task-data", str(task), "--out", str(task)),
                   "an input of this command")


def test_data_build_run_json_hashes_what_it_read_and_wrote(tmp_path):
    from mogu.train.recipes import build_data

    harmful = tmp_path / "harm.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"Explain how to pick lock number {i}"}) + "\n" for i in range(12)))
    benign = tmp_path / "ben.jsonl"
    benign.write_text("".join(json.dumps({"prompt": f"Name a colour, {i}", "answer": f"Blue {i}."}) + "\n"
                              for i in range(12)))
    out = tmp_path / "data"
    extra = tmp_path / "harm2.jsonl"  # the comma form: both files read, both hashed
    extra.write_text(json.dumps({"prompt": "Explain how to hotwire a car"}) + "\n")
    build_data("unused", out, harmful=f"{harmful},{extra}", benign=str(benign), output_field="answer",
               builtin_probe=False, log=lambda m: None)
    record = json.loads((out / "run.json").read_text())
    assert str(extra) in record["data_sha256"]
    hashed = {Path(p).name for p in record["data_sha256"]}
    assert {"harm.jsonl", "ben.jsonl", "glad_pairs.jsonl", "unwill_pairs.jsonl", "router.jsonl", "dev.jsonl"} <= hashed
    assert record["args"]["output_field"] == "answer"
    before = record["data_sha256"][str(benign)]
    benign.write_text(benign.read_text().replace("Blue 0.", "Red 0."))
    build_data("unused", out, harmful=f"{harmful},{extra}", benign=str(benign), output_field="answer",
               builtin_probe=False, log=lambda m: None)
    assert json.loads((out / "run.json").read_text())["data_sha256"][str(benign)] != before


def test_git_commit_is_moguss_own_checkout_not_the_project_it_is_installed_in(tmp_path):
    import subprocess

    from mogu.io import git_commit

    def repo(path: Path, files: dict[str, str]) -> str:
        for name, text in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(text)
        git = lambda *a: subprocess.run(["git", *a], cwd=path, check=True, capture_output=True, text=True)  # noqa: E731
        git("init", "-q")
        git("add", "-A")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
        return git("rev-parse", "HEAD").stdout.strip()

    # mogu installed in an (ignored) venv inside the user's own repository: not mogu's commit
    project = tmp_path / "project"
    repo(project, {"pyproject.toml": 'name = "theirs"\n', "venv/lib/site-packages/mogu/__init__.py": ""})
    assert git_commit(project / "venv" / "lib" / "site-packages" / "mogu") is None
    checkout = tmp_path / "mogu"
    head = repo(checkout, {"pyproject.toml": '[project]\nname = "mogu"\n', "src/mogu/__init__.py": ""})
    assert git_commit(checkout / "src" / "mogu") == head


def test_a_run_folder_may_hold_its_own_data_folder_but_not_be_an_input_or_hold_one_it_deletes(tmp_path):
    from mogu.io import check_run_folder, mark_run_folder

    run = tmp_path / "run1"
    mark_run_folder(run)
    (run / "data").mkdir()
    (run / "data" / "router.jsonl").write_text("{}\n")
    check_run_folder(run, command="mogu train", protected=[run / "data"])  # `--data run1/data --out run1`
    (run / "checkpoints" / "glad").mkdir(parents=True)
    for inside in (run, run / "checkpoints" / "glad"):
        with pytest.raises(RefusedOverwriteError, match="an input of this command"):
            check_run_folder(run, command="mogu train", protected=[inside])
