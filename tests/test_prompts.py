"""Prompt-file parsing (txt with kohya options, jsonl, csv) and safe image file names."""

from __future__ import annotations

import json
import os

import pytest

from latentdiff.naming import grid_filename, image_filename, inside, slugify
from latentdiff.prompts import (
    FALLBACK_SAMPLERS,
    LineError,
    PromptFileError,
    PromptJob,
    parse_prompts,
    parse_txt_line,
    read_prompt_file,
    sampler_names,
)


def txt(line: str) -> PromptJob | LineError:
    return parse_txt_line(line, 7)


# --- .txt -------------------------------------------------------------------------------------------


def test_txt_all_options():
    job = txt("a cat in a hat --n blurry, dark --w 64 --h 48 --d 42 --s 20 --l 7.5 --ss euler_a")
    assert job == PromptJob(
        line=7,
        prompt="a cat in a hat",
        negative_prompt="blurry, dark",
        width=64,
        height=48,
        seed=42,
        steps=20,
        guidance_scale=7.5,
        sampler="euler_a",
    )


def test_txt_options_in_any_order_and_extra_spaces():
    job = txt("  a dog   --s 3   --n  ugly hands  --d 0 ")
    assert (job.prompt, job.steps, job.negative_prompt, job.seed) == ("a dog", 3, "ugly hands", 0)


@pytest.mark.parametrize(
    "line",
    [
        "it's a \"quoted\" 'prompt' with apostrophes",
        "a -- b",
        "a cat --not-an-option here",
        "x--n y",
        "trailing dashes --",
        "comma --n, after",
        "em—dash – and ‘curly’ “quotes” 日本語のプロンプト 🐱",
        "a cat -n 3 -w 5",
        "tab\tseparated\ttext",
        "a cat --9 lives",
    ],
)
def test_txt_prompt_text_is_never_parsed(line):
    job = txt(line)
    assert isinstance(job, PromptJob), job
    assert job.prompt == line.strip()
    assert job.negative_prompt is None and job.seed is None


def test_txt_quotes_in_option_values_are_text():
    job = txt("""a "cat" --n don't, "blurry" --d 5""")
    assert job.prompt == 'a "cat"'
    assert job.negative_prompt == """don't, "blurry\""""
    assert job.seed == 5


def test_txt_option_after_tab():
    assert txt("a cat\t--s\t4").steps == 4


@pytest.mark.parametrize(
    "line, message",
    [
        ("a cat --x 3", "unknown option --x"),
        ("a cat --steps 3", "unknown option --steps"),
        ("a cat --w wide", "--w must be a whole number, got 'wide'"),
        ("a cat --w 6.5", "--w must be a whole number"),
        ("a cat --s 0", "--s must be at least 1"),
        ("a cat --h -8", "--h must be at least 1"),
        ("a cat --d -1", "--d must be between 0 and"),
        (f"a cat --d {2**64}", "--d must be between 0 and"),
        ("a cat --l seven", "--l must be a number, got 'seven'"),
        ("a cat --l nan", "--l must be a finite number"),
        ("a cat --ss warp_drive", "unknown sampler 'warp_drive'; choose from"),
        ("a cat --s 3 --s 4", "option --s given twice"),
        ("a cat --d", "option --d needs a value"),
        ("a cat --n --d 3", "option --n needs a value"),
        ("--s 20", "no prompt before the options"),
        ("--n ugly", "no prompt before the options"),
    ],
)
def test_txt_bad_lines_are_errors_with_line_numbers(line, message):
    err = txt(line)
    assert isinstance(err, LineError)
    assert err.line == 7
    assert message in err.message
    assert str(err).startswith("line 7: ")


def test_txt_sampler_names_are_case_insensitive_and_validated():
    assert txt("x --ss DDIM").sampler == "ddim"
    assert set(sampler_names()) >= {"ddim", "euler"}
    assert set(FALLBACK_SAMPLERS) == {"ddpm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m"}


def test_txt_file_bom_crlf_blank_and_comments(tmp_path):
    text = "\ufeff# a comment\r\n\r\nfirst prompt --d 1\r\n   \r\n  # indented comment\r\nsecond\r\n"
    path = tmp_path / "p.txt"
    path.write_bytes(text.encode("utf-8"))
    jobs, errors = read_prompt_file(path)
    assert errors == []
    assert [(j.line, j.prompt, j.seed) for j in jobs] == [(3, "first prompt", 1), (6, "second", None)]


def test_txt_file_bad_lines_do_not_stop_the_rest(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("good one\nbad --q 1\ngood two --s 2\nbad --w x\n", encoding="utf-8")
    jobs, errors = read_prompt_file(path)
    assert [j.line for j in jobs] == [1, 3]
    assert [e.line for e in errors] == [2, 4]


def test_unicode_line_separators_do_not_split_lines():
    jobs, errors = parse_prompts("a\u2028b\x0cc\nnext\n", "txt")
    assert [j.prompt for j in jobs] == ["a\u2028b\x0cc", "next"] and [j.line for j in jobs] == [1, 2]


# --- .jsonl ------------------------------------------------------------------------------------------


def test_jsonl_all_keys_and_errors(tmp_path):
    lines = [
        json.dumps(
            {
                "prompt": "a --n not an option",
                "negative_prompt": "ugly",
                "seed": 3,
                "steps": 4,
                "guidance_scale": 5,
                "width": 32,
                "height": 16,
                "sampler": "heun",
                "images": 2,
            }
        ),
        "",
        '{"prompt": "bad json"',
        json.dumps({"prompt": "x", "colour": "red"}),
        json.dumps({"negative_prompt": "no prompt"}),
        json.dumps({"prompt": "x", "steps": "4"}),
        json.dumps({"prompt": "x", "steps": 4.5}),
        json.dumps({"prompt": "x", "steps": 4.0, "seed": None, "width": True}),
        json.dumps(["a list"]),
        json.dumps({"prompt": "x", "sampler": "nope"}),
        json.dumps({"prompt": "ok", "seed": None}),
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8-sig")
    jobs, errors = read_prompt_file(path)
    assert jobs[0] == PromptJob(
        line=1,
        prompt="a --n not an option",
        negative_prompt="ugly",
        seed=3,
        steps=4,
        guidance_scale=5.0,
        width=32,
        height=16,
        sampler="heun",
        images=2,
    )
    assert isinstance(jobs[0].guidance_scale, float)
    assert [(j.line, j.prompt) for j in jobs[1:]] == [(11, "ok")]
    messages = {e.line: e.message for e in errors}
    assert "not valid JSON" in messages[3]
    assert "unknown key(s) 'colour'" in messages[4]
    assert "missing or empty 'prompt'" in messages[5]
    assert "'steps' must be a number" in messages[6]
    assert "'steps' must be a whole number" in messages[7]
    assert "'width' must be a number, got true" in messages[8]
    assert "expected a JSON object" in messages[9]
    assert "unknown sampler 'nope'" in messages[10]
    assert sorted(messages) == [3, 4, 5, 6, 7, 8, 9, 10]


# --- .csv --------------------------------------------------------------------------------------------


def test_csv_rows_quotes_multiline_and_errors(tmp_path):
    text = (
        "prompt,seed,steps,negative_prompt,guidance_scale\r\n"
        "plain,1,2,,\r\n"
        '"with, comma and ""quotes"" --d 9",,,"bad, ugly",7\r\n'
        '"two\nlines",5,,,\r\n'
        "bad seed,abc,,,\r\n"
        "\r\n"
        "too,many,fields,here,1,2\r\n"
        ",3,,,\r\n"
        "last,,,,1.5\r\n"
    )
    path = tmp_path / "p.csv"
    path.write_bytes(("\ufeff" + text).encode("utf-8"))
    jobs, errors = read_prompt_file(path)
    assert [(j.line, j.prompt, j.seed, j.steps, j.negative_prompt, j.guidance_scale) for j in jobs] == [
        (2, "plain", 1, 2, None, None),
        (3, 'with, comma and "quotes" --d 9', None, None, "bad, ugly", 7.0),
        (4, "two\nlines", 5, None, None, None),
        (10, "last", None, None, None, 1.5),
    ]
    messages = {e.line: e.message for e in errors}
    assert "'seed' must be a whole number" in messages[6]
    assert "expected 5 fields, got 6" in messages[8]
    assert "missing or empty 'prompt'" in messages[9]
    assert sorted(messages) == [6, 8, 9]


@pytest.mark.parametrize(
    "header, message", [("prompt,colour", "unknown column(s) 'colour'"), ("seed,steps", "no 'prompt' column")]
)
def test_csv_bad_header_is_a_line_1_error(header, message):
    jobs, errors = parse_prompts(header + "\nx,1\n", "csv")
    assert jobs == []
    assert len(errors) == 1 and errors[0].line == 1 and message in errors[0].message


# --- whole-file errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig"])
def test_prompt_file_with_a_byte_order_mark(tmp_path, encoding):
    """Windows PowerShell 5 writes `echo ... > prompts.txt` as UTF-16 with a mark; Notepad adds one to UTF-8."""
    path = tmp_path / "p.txt"
    data = "Ünïcode fox --d 4\r\n# note\r\nsecond\r\n".encode(encoding)
    path.write_bytes(data if encoding != "utf-16-be" else b"\xfe\xff" + data)
    jobs, errors = read_prompt_file(path)
    assert [(j.line, j.prompt, j.seed) for j in jobs] == [(1, "Ünïcode fox", 4), (3, "second", None)]
    assert errors == []
    path.write_bytes(b"\xff\xfe" + "ok\nbad ".encode("utf-16-le") + b"\x00\xd8")  # a lone surrogate
    with pytest.raises(PromptFileError, match=r"p.txt: marked UTF-16 but not valid UTF-16 \(line 2, byte 16\)"):
        read_prompt_file(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(PromptFileError, match="cannot read prompt file"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "p.yaml").write_text("x")
    with pytest.raises(PromptFileError, match=r"file type '.yaml'; use one of .txt, .jsonl, .csv"):
        read_prompt_file(tmp_path / "p.yaml")
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match=r"not UTF-8 \(line 2"):
        read_prompt_file(tmp_path / "latin1.txt")


# --- file names --------------------------------------------------------------------------------------


def test_image_filename_is_deterministic_and_readable():
    assert image_filename("A Cat, in a HAT!", 3, 1, 42) == "00003-01-42-a-cat-in-a-hat.png"
    assert image_filename("A Cat, in a HAT!", 3, 1, 42) == image_filename("A Cat, in a HAT!", 3, 1, 42)
    assert grid_filename("A Cat", 12) == "00012-grid-a-cat.png"


HOSTILE = [
    "../../etc/passwd",
    "/absolute/path",
    "..\\..\\windows\\system32",
    "a\x00b",
    "CON",
    "nul",
    "com1.txt",
    ".hidden",
    "...",
    "",
    "   ",
    'con<>:"/\\|?*',
    "\u202eevil\u200b",
    "日本語" * 200,
    "e\u0301" * 100,
    "🐱" * 100,
    "\u0301leading mark",
]


@pytest.mark.parametrize("prompt", HOSTILE)
def test_hostile_prompts_give_safe_names(prompt, tmp_path):
    name = image_filename(prompt, 1, 0, 7)
    assert name.startswith("00001-00-7-") and name.endswith(".png")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not any(c in name for c in '<>:"|?*')
    assert all(c.isprintable() for c in name)
    assert len(name.encode("utf-8")) < 255
    assert inside(tmp_path, name).parent == tmp_path.resolve()
    (tmp_path / name).write_bytes(b"ok")  # the file system accepts it
    assert os.listdir(tmp_path) == [name]


def test_slug_is_capped_in_bytes_without_cutting_characters():
    for prompt in ["日本語" * 200, "e\u0301" * 100, "🐱" * 100, "a" * 500]:
        for cap in (1, 7, 80):
            slug = slugify(prompt, cap)
            assert len(slug.encode("utf-8")) <= cap or slug == "prompt"
            slug.encode("utf-8").decode("utf-8")  # whole characters only
    assert slugify("日本語" * 200, 7) == "日本"  # 3 bytes each: two fit in 7
    assert slugify("e\u0301" * 100, 80) == "\u00e9" * 40  # NFC: é is one 2-byte character
    assert slugify("CON") == "_con"
    assert slugify("../..") == "prompt"


def test_inside_refuses_escapes(tmp_path):
    for bad in ["../x.png", "/etc/x.png", "a/b.png", "x\x00.png"]:
        with pytest.raises(ValueError, match="unsafe file name"):
            inside(tmp_path, bad)
