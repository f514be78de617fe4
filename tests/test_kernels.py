"""Tests of kernel specs and kernel files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lem_fixtures.errors import KernelError
from lem_fixtures.kernels import (
    BASELINE,
    Kernel,
    condition_names,
    load_kernel,
    load_kernels,
    parse_kernel_spec,
    text_sha256,
)


def test_parse_named_spec():
    assert parse_kernel_spec("json=kernel/axioms.json") == ("json", Path("kernel/axioms.json"))


def test_parse_spec_without_name_uses_stem():
    assert parse_kernel_spec("kernel/lek-kernel.txt") == ("lek-kernel", Path("kernel/lek-kernel.txt"))


def test_parse_spec_keeps_equals_in_path():
    assert parse_kernel_spec("a=dir/x=y.txt") == ("a", Path("dir/x=y.txt"))


def test_parse_spec_document_suffix_not_in_name():
    assert parse_kernel_spec("kernel/all.txt#2") == ("all", Path("kernel/all.txt#2"))


@pytest.mark.parametrize("spec", ["=kernel.txt", " =kernel.txt"])
def test_parse_spec_without_name(spec):
    with pytest.raises(KernelError) as raised:
        parse_kernel_spec(spec)
    assert str(raised.value) == f"kernel spec {spec!r} has no name; write NAME=PATH, for example json=kernel/axioms.json"


def test_parse_spec_without_path():
    with pytest.raises(KernelError) as raised:
        parse_kernel_spec("json=")
    assert str(raised.value) == "kernel spec 'json=' has no path; write NAME=PATH, for example json=kernel/axioms.json"


def test_load_keeps_text_as_stored(tmp_path):
    raw = b"line one\r\nline two\n\n  trailing  \n"
    (tmp_path / "k.txt").write_bytes(raw)
    kernel = load_kernel("k=k.txt", base_dir=tmp_path)

    assert kernel == Kernel("k", tmp_path / "k.txt", raw.decode(), hashlib.sha256(raw).hexdigest())
    assert kernel.text == "line one\r\nline two\n\n  trailing  \n"


def test_relative_path_uses_cwd_by_default(tmp_path, monkeypatch):
    (tmp_path / "kernel.txt").write_text("text", encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    assert load_kernel("kernel.txt").path == Path.cwd() / "kernel.txt"


def test_absolute_path_ignores_base_dir(tmp_path):
    path = tmp_path / "k.txt"
    path.write_text("text", encoding="utf-8")

    assert load_kernel(f"k={path}", base_dir="/nonexistent").path == path


def test_missing_file(tmp_path):
    with pytest.raises(KernelError) as raised:
        load_kernel("json=absent.json", base_dir=tmp_path)
    assert str(raised.value) == (
        f"kernel file not found: {tmp_path / 'absent.json'} (spec 'json=absent.json'); "
        "check the path or pass an absolute one"
    )


def test_directory(tmp_path):
    (tmp_path / "dir").mkdir()

    with pytest.raises(KernelError) as raised:
        load_kernel("d=dir", base_dir=tmp_path)
    assert str(raised.value) == f"kernel path {tmp_path / 'dir'} (spec 'd=dir') is a directory; give a file"


@pytest.mark.parametrize("content", ["", "   \n\t\n"], ids=["empty", "whitespace"])
def test_empty_or_whitespace_file(tmp_path, content):
    (tmp_path / "k.txt").write_text(content, encoding="utf-8")

    with pytest.raises(KernelError) as raised:
        load_kernel("k=k.txt", base_dir=tmp_path)
    assert str(raised.value) == (
        f"kernel file {tmp_path / 'k.txt'} (spec 'k=k.txt') is empty or only whitespace; give a file with the kernel text"
    )


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_unreadable_file(tmp_path):
    path = tmp_path / "k.txt"
    path.write_text("secret", encoding="utf-8")
    path.chmod(0)

    with pytest.raises(KernelError) as raised:
        load_kernel("k=k.txt", base_dir=tmp_path)
    assert str(raised.value) == f"cannot read kernel file {path} (spec 'k=k.txt'): Permission denied"


def test_not_utf8(tmp_path):
    (tmp_path / "k.txt").write_bytes(b"caf\xe9")

    with pytest.raises(KernelError) as raised:
        load_kernel("k=k.txt", base_dir=tmp_path)
    assert str(raised.value) == (
        f"kernel file {tmp_path / 'k.txt'} (spec 'k=k.txt') is not valid UTF-8 "
        "(byte 3: unexpected end of data); save it as UTF-8"
    )


def test_json_document_suffix(tmp_path):
    (tmp_path / "all.txt").write_text('{"a": 1}\n{\n  "b": [2]\n}\n[3]\n', encoding="utf-8")
    kernel = load_kernel("second=all.txt#2", base_dir=tmp_path)

    assert kernel.text == '{\n  "b": [2]\n}'
    assert kernel.document == 2
    assert kernel.path == tmp_path / "all.txt"
    assert kernel.sha256 == text_sha256('{\n  "b": [2]\n}')


def test_json_document_out_of_range(tmp_path):
    (tmp_path / "all.txt").write_text('{"a": 1} {"b": 2}', encoding="utf-8")

    with pytest.raises(KernelError) as raised:
        load_kernel("x=all.txt#3", base_dir=tmp_path)
    assert str(raised.value) == (
        f"kernel file {tmp_path / 'all.txt'} (spec 'x=all.txt#3') has 2 JSON documents, so #3 does not exist; use #1 to #2"
    )


def test_json_document_in_plain_text(tmp_path):
    (tmp_path / "plain.txt").write_text("not json", encoding="utf-8")

    with pytest.raises(KernelError) as raised:
        load_kernel("x=plain.txt#1", base_dir=tmp_path)
    assert str(raised.value) == (
        f"kernel file {tmp_path / 'plain.txt'} (spec 'x=plain.txt#1') is not a sequence of JSON documents: "
        "Expecting value at line 1 column 1; drop the #N suffix to use the whole file"
    )


def test_file_name_with_hash_wins(tmp_path):
    (tmp_path / "k.txt#2").write_text("literal", encoding="utf-8")

    kernel = load_kernel("k=k.txt#2", base_dir=tmp_path)
    assert kernel.text == "literal"
    assert kernel.document is None


def test_upstream_kernels(lem_reference):
    kernels = load_kernels(["json=kernel/lek-1-kernel.txt#2", "txt=kernel/lek-1-kernel.txt"], base_dir=lem_reference)
    full_text = (lem_reference / "kernel" / "lek-1-kernel.txt").read_bytes().decode("utf-8")

    assert [kernel.name for kernel in kernels] == ["json", "txt"]
    assert kernels[1].text == full_text
    assert kernels[0].text in full_text
    assert kernels[0].text.startswith('{\n  "::": "axioms-of-life/claude-native"')
    assert len(kernels[0].text) == 2182


def test_load_kernels_rejects_baseline_name(tmp_path):
    (tmp_path / "k.txt").write_text("x", encoding="utf-8")

    with pytest.raises(KernelError) as raised:
        load_kernels(["baseline=k.txt"], base_dir=tmp_path)
    assert str(raised.value) == "kernel spec 'baseline=k.txt' uses the reserved name 'baseline'; name it with NAME=PATH"


def test_load_kernels_rejects_repeated_name(tmp_path):
    (tmp_path / "k.txt").write_text("x", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "k.txt").write_text("y", encoding="utf-8")

    with pytest.raises(KernelError) as raised:
        load_kernels(["k.txt", "sub/k.txt"], base_dir=tmp_path)
    assert str(raised.value) == "kernel name 'k' is given twice (spec 'sub/k.txt'); name each kernel with NAME=PATH"


def test_condition_names(tmp_path):
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "b.txt").write_text("b", encoding="utf-8")
    kernels = load_kernels(["json=a.txt", "b.txt"], base_dir=tmp_path)

    assert condition_names(kernels) == [BASELINE, "json", "b"]
    assert condition_names([]) == ["baseline"]


def test_text_sha256_of_surrogates():
    assert text_sha256("\ud800") == hashlib.sha256(b"\xed\xa0\x80").hexdigest()


def test_read_error_reported(tmp_path, monkeypatch):
    path = tmp_path / "k.txt"
    path.write_text("text", encoding="utf-8")

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    # Root can read a chmod 0 file, so the OS error is raised here directly.
    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(KernelError) as raised:
        load_kernel("k=k.txt", base_dir=tmp_path)
    assert str(raised.value) == f"cannot read kernel file {path} (spec 'k=k.txt'): Permission denied"
