"""Line-preserving rewrite of our CUDA sources into plain C++ for the CPU emulator (csrc/emu/).

Kernels stay plain CUDA that nvcc compiles unchanged; the emulator build compiles a rewritten copy of csrc/ in which
  * `kernel<<<grid, block, smem, stream>>>(args)` becomes `::subq_emu::launch("kernel", kernel, grid, block, smem,
    stream)(args)`;
  * `__shared__ T a[n], b[m];` becomes `auto& a = ::subq_emu::shared<T[(n)], align>("a", [] {}); ...` (the
    block's copy, one exact allocation per declaration and instantiation: the lambda's type tells them apart);
  * `extern __shared__ T name[];` becomes `#define name (::subq_emu::dynamic_shared_as<T>())`;
  * in the torch glue, the ops register under `subq_emu` with their CUDA implementations serving CPU tensors, and
    the outputs and workspaces they allocate are filled with NaN / -1 first (initcheck).
Every rewritten file starts with `#line 1 "<original path>"` and keeps each statement on its original lines, so
compiler messages, sanitizer reports and the emulator's own reports name the original source line.
"""
from __future__ import annotations

import re
from pathlib import Path

_SHARED = re.compile(r"\b__shared__\b")
_ALIGN = re.compile(r"__align__\s*\(\s*([^)]*)\)")
_IDENT_CHARS = re.compile(r"[A-Za-z0-9_:]")


def _pad(original: str, replacement: str) -> str:
    """`replacement` followed by as many newlines as `original` spans, so later lines keep their numbers."""
    return replacement + "\n" * original.count("\n")


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _declarator(text: str) -> tuple[str, str]:
    """'name[a][b]' -> ('name', '[(a)][(b)]')."""
    text = text.strip()
    m = re.match(r"([A-Za-z_]\w*)\s*(.*)$", text, re.S)
    if not m:
        raise ValueError(f"cannot parse __shared__ declarator {text!r}")
    name, dims = m.group(1), m.group(2).strip()
    return name, "".join(f"[({d})]" for d in re.findall(r"\[(.*?)\]", dims, re.S))


def _rewrite_shared(statement: str) -> str:
    """One `__shared__ ...;` statement (without the ';') -> emulator declarations."""
    body = _SHARED.sub("", statement, count=1)
    align = "0"
    m = _ALIGN.search(body)
    if m:
        align = m.group(1)
        body = body[: m.start()] + body[m.end():]
    body = " ".join(body.split())
    if body.startswith("extern "):
        body = body[len("extern "):]
        m = re.match(r"(.*?)([A-Za-z_]\w*)\s*\[\s*\]$", body)
        if not m:
            raise ValueError(f"cannot parse extern __shared__ declaration {statement!r}")
        return f"#define {m.group(2)} (::subq_emu::dynamic_shared_as<{m.group(1).strip()}>())"
    first, *rest = _split_top_level(body)
    bracket = first.find("[")
    head = first if bracket < 0 else first[:bracket]
    m = re.match(r"(.*?)([A-Za-z_]\w*)\s*$", head, re.S)
    if not m:
        raise ValueError(f"cannot parse __shared__ declaration {statement!r}")
    base_type = m.group(1).strip()
    declarators = [m.group(2) + ("" if bracket < 0 else first[bracket:])] + rest
    out = []
    for d in declarators:
        name, dims = _declarator(d)
        out.append(f'auto& {name} = ::subq_emu::shared<{base_type}{dims}, {align}>("{name}", [] {{}});')
    return " ".join(out)


def _rewrite_shared_declarations(src: str) -> str:
    out, pos = [], 0
    for m in _SHARED.finditer(src):
        if m.start() < pos:
            continue
        start = m.start()
        # Include a leading 'extern' on the same statement.
        prefix = src[max(0, start - 16):start]
        em = re.search(r"\bextern\s+$", prefix)
        if em:
            start -= len(prefix) - em.start()
        end = src.index(";", m.end())
        statement = src[start:end]
        out.append(src[pos:start])
        replacement = _rewrite_shared(statement)
        if replacement.startswith("#define"):
            # A directive needs a line of its own: the declaration was alone on its line.
            line_start = src.rfind("\n", 0, start) + 1
            if src[line_start:start].strip():
                raise ValueError(f"extern __shared__ must start its line: {statement!r}")
        out.append(_pad(statement, replacement))
        pos = end + 1
    out.append(src[pos:])
    return "".join(out)


def _kernel_expression_start(src: str, end: int) -> int:
    """Start of the kernel expression (`name` or `name<args>`) that ends just before `end`."""
    i = end - 1
    while i >= 0 and src[i].isspace():
        i -= 1
    if src[i] == ">":
        depth = 0
        while i >= 0:
            if src[i] == ">":
                depth += 1
            elif src[i] == "<":
                depth -= 1
                if depth == 0:
                    break
            i -= 1
        i -= 1
    while i >= 0 and _IDENT_CHARS.match(src[i]):
        i -= 1
    return i + 1


def _deduced_template(src: str, kernel: str) -> bool:
    """A bare name that this file declares as a kernel template: its template arguments come from the call."""
    if not re.fullmatch(r"\w+", kernel):
        return False
    return re.search(r"template\s*<[^;{]*>\s*__global__[^;{(]*\b" + kernel + r"\s*\(", src) is not None


def _rewrite_launches(src: str) -> str:
    while (open_at := src.find("<<<")) >= 0:
        close_at = src.index(">>>", open_at)
        start = _kernel_expression_start(src, open_at)
        kernel = src[start:open_at].rstrip()
        config = src[open_at + 3:close_at]
        name = " ".join(kernel.split())
        if _deduced_template(src, kernel):
            replacement = f'::subq_emu::launch_by_call("{name}", [](auto&... a) {{ {kernel}(a...); }}, {config})'
        else:
            replacement = f'::subq_emu::launch("{name}", {kernel}, {config})'
        src = src[:start] + replacement + src[close_at + 3:]
    return src


def rewrite_kernel_source(src: str) -> str:
    return _rewrite_launches(_rewrite_shared_declarations(src))


_GLUE_RULES = [
    (re.compile(r"TORCH_LIBRARY_FRAGMENT\(\s*subq\s*,"), "TORCH_LIBRARY_FRAGMENT(subq_emu,"),
    (re.compile(r"TORCH_LIBRARY\(\s*subq\s*,"), "TORCH_LIBRARY_FRAGMENT(subq_emu,"),
    (re.compile(r"TORCH_LIBRARY_IMPL\(\s*subq\s*,\s*CPU\s*,\s*m\s*\)"),
     "[[maybe_unused]] static void subq_emu_unused_composite_impls(torch::Library& m)"),
    (re.compile(r"TORCH_LIBRARY_IMPL\(\s*subq\s*,\s*CUDA\s*,"), "TORCH_LIBRARY_IMPL(subq_emu, CPU,"),
    (re.compile(r"\.is_cuda\(\)"), ".is_cpu()"),
    (re.compile(r"\bat::empty_like\("), "::subq_emu_glue::poisoned_empty_like("),
    (re.compile(r"\bat::empty\("), "::subq_emu_glue::poisoned_empty("),
]


def rewrite_glue_source(src: str) -> str:
    for pattern, replacement in _GLUE_RULES:
        src = pattern.sub(replacement, src)
    return src


def rewritten_path(rel: Path) -> Path:
    """Where the rewritten copy of csrc/`rel` goes, relative to the rewritten tree: a .cu becomes a .cu.cpp."""
    return rel.with_suffix(".cu.cpp") if rel.suffix == ".cu" else rel


def rewrite_source(rel: Path, text: str, original: Path) -> str:
    """The rewritten text of csrc/`rel` (whose text is `text`), its lines named after `original`."""
    if rel.parts[0] == "torch":
        text = rewrite_glue_source(text)
    elif rel.suffix in {".cu", ".cuh"}:
        text = rewrite_kernel_source(text)
    return f'#line 1 "{original.resolve()}"\n' + text


def rewrite_tree(csrc: Path, out: Path) -> list[Path]:
    """Rewrites every source under csrc/ into out/ (same relative paths); returns the files whose text changed.

    Unchanged files are left untouched so the emulator build recompiles only what changed."""
    changed = []
    for path in sorted(csrc.rglob("*")):
        if path.suffix not in {".cu", ".cuh", ".h", ".cpp"} or "emu" in path.relative_to(csrc).parts[:1]:
            continue
        rel = path.relative_to(csrc)
        target = out / rewritten_path(rel)
        text = rewrite_source(rel, path.read_text(), path)
        if not target.exists() or target.read_text() != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            changed.append(target)
    return changed
