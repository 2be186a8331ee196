import json
import math
import subprocess
import sys

import pytest
import torch

from finite.cli import main
from finite.cli._output import jsonable
from finite.formats import FORMATS, cast_report


@pytest.fixture
def state_dict_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {
        "model": {
            "huge.weight": torch.randn(40, 30, generator=generator) * 1e5,
            "tiny.weight": torch.randn(50, generator=generator) * 1e-9,
            "fine.weight": torch.randn(3, 4, generator=generator),
            "fine.bias": torch.randn(4, generator=generator).half(),
            "step": torch.tensor(3),
        },
        "optimizer": [
            torch.randn(2, generator=generator),
            {"broken": torch.tensor([1.0, math.nan])},
        ],
        "epoch": 7,
    }
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    return path, state


def test_json_table_parses_and_matches_formats(capsys):
    assert main(["formats", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {name: jsonable(fmt) for name, fmt in FORMATS.items()}
    assert printed["float8_e4m3fn"]["max"] == 448.0
    assert printed["tfloat32"]["torch_dtype"] is None


def test_table_shows_every_format_with_its_range(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in FORMATS:
        assert name in out
    for text in ("65504", "448", "57344", "2^-24", "2^-149", "2^-136"):
        assert text in out


def test_table_rows_do_not_wrap_when_printed_to_a_pipe(capsys):
    main(["formats"])
    lines = capsys.readouterr().out.splitlines()
    assert sum("float8_e4m3fn" in line and "448" in line for line in lines) == 1


def test_formats_option_selects_rows(capsys):
    assert main(["formats", "--formats", "bf16", "e5m2", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == ["bfloat16", "float8_e5m2"]


def test_unknown_format_name_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["formats", "--formats", "fp12"])
    assert exit_info.value.code == 2
    assert "valid names" in capsys.readouterr().err


def test_check_json_reports_every_floating_tensor_and_format(state_dict_file, capsys):
    path, state = state_dict_file
    assert main(["formats", "--check", str(path), "--json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["formats"] == ["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]
    tensors = {entry["name"]: entry for entry in printed["tensors"]}
    assert set(tensors) == {
        "model.huge.weight",
        "model.tiny.weight",
        "model.fine.weight",
        "model.fine.bias",
        "optimizer.0",
        "optimizer.1.broken",
    }
    assert printed["skipped"] == [{"name": "model.step", "dtype": "int64"}]
    huge = tensors["model.huge.weight"]
    assert huge["shape"] == [40, 30] and huge["dtype"] == "float32"
    expected = jsonable(cast_report(state["model"]["huge.weight"], torch.float16))
    assert {field: huge["casts"]["float16"][field] for field in expected} == expected


def test_check_flags_overflow_and_large_underflow_only(state_dict_file, capsys):
    path, _ = state_dict_file
    main(["formats", "--check", str(path), "--json"])
    casts = {e["name"]: e["casts"] for e in json.loads(capsys.readouterr().out)["tensors"]}
    assert casts["model.huge.weight"]["float16"]["problems"] == ["overflow"]
    assert casts["model.huge.weight"]["bfloat16"]["survives"]
    assert casts["model.tiny.weight"]["float16"]["problems"] == ["underflow"]
    assert casts["model.fine.weight"]["float16"]["survives"]
    assert casts["optimizer.1.broken"]["float16"]["already_nonfinite"] == 0.5


def test_check_max_underflow_sets_the_underflow_threshold(tmp_path, capsys):
    path = tmp_path / "half_tiny.pt"
    torch.save({"w": torch.tensor([1.0, 1e-9])}, path)
    assert main(["formats", "--check", str(path), "--formats", "fp16", "--json"]) == 1
    capsys.readouterr()
    args = ["formats", "--check", str(path), "--formats", "fp16", "--max-underflow", "0.5"]
    assert main(args) == 0


def test_check_human_output_names_the_tensors_that_would_not_survive(state_dict_file, capsys):
    path, _ = state_dict_file
    assert main(["formats", "--check", str(path), "--formats", "fp16"]) == 1
    out = capsys.readouterr().out
    assert "2 of 6 tensors would not survive float16" in out
    assert "model.huge.weight (overflow)" in out
    assert "model.tiny.weight (underflow)" in out
    assert "Already inf or NaN before any cast: optimizer.1.broken" in out
    assert "model.step (int64)" in out


def test_check_exits_0_when_every_tensor_survives(tmp_path, capsys):
    path = tmp_path / "fine.pt"
    torch.save([torch.randn(8), torch.randn(2, 2)], path)
    assert main(["formats", "--check", str(path), "--formats", "bf16"]) == 0
    assert "All 2 tensors survive bfloat16" in capsys.readouterr().out


def test_check_accepts_a_bare_tensor(tmp_path, capsys):
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), path)
    assert main(["formats", "--check", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"][0]["name"] == "<tensor>"


def test_check_missing_file_exits_2_with_a_message(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert main(["formats", "--check", str(missing)]) == 2
    captured = capsys.readouterr()
    assert f"cannot read {missing}" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_check_non_torch_file_exits_2(tmp_path, capsys):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint\n")
    assert main(["formats", "--check", str(path)]) == 2
    assert "cannot read" in capsys.readouterr().err


class Custom:
    pass


def test_check_file_with_arbitrary_objects_exits_2(tmp_path, capsys):
    path = tmp_path / "pickled.pt"
    torch.save({"object": Custom()}, path)
    assert main(["formats", "--check", str(path)]) == 2
    assert "weights_only" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "lots"])
def test_max_underflow_must_be_a_fraction(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["formats", "--max-underflow", value])
    assert exit_info.value.code == 2


def test_python_dash_m_finite_formats_prints_json():
    result = subprocess.run(
        [sys.executable, "-m", "finite", "formats", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {name: jsonable(f) for name, f in FORMATS.items()}
