"""The house in floors: import contracts (import-linter), what ``import lorafit`` loads, function length, the
optional-dependency check of each command, and docs/cli.md's flag table against the generated one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_data, make_model_dir, run_cli

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lorafit"
MAX_FUNCTION_LINES = 60


def test_import_contracts_hold():
    """The layers, 'nothing imports cli', a torch-only core and no cycles (pyproject.toml's contracts)."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_ruff_is_clean():
    """Ruff's pycodestyle, pyflakes and import-order rules at 120 columns (pyproject.toml's [tool.ruff]), over src,
    tests, benchmarks and examples."""
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "--no-cache", "src", "tests", "benchmarks", "examples"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_is_named_like_a_standard_library_module():
    """``lorafit/io.py`` made readers import ours as ``lio``; a module named ``inspect`` or ``io`` misleads."""
    clashes = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
               if p.stem in sys.stdlib_module_names or (p.name == "__init__.py" and p.parent.name in
                                                        sys.stdlib_module_names)]
    assert not clashes, clashes


def test_the_old_module_names_still_import_with_a_deprecation_warning():
    """``lorafit.io`` and ``lorafit.trainer`` (the names of 0.1.0's first releases) import without a file of that
    name, and warn on first use."""
    code = ("import sys, warnings\nimport lorafit\nassert 'transformers' not in sys.modules\n"
            "warnings.simplefilter('error', DeprecationWarning)\nimport lorafit.io, lorafit.trainer\n"
            "for old, name in ((lorafit.io, 'adapter_state_dict'), (lorafit.trainer, 'load_adapter')):\n"
            "    try:\n        getattr(old, name)\n    except DeprecationWarning as e:\n        print(e)\n"
            "warnings.simplefilter('ignore', DeprecationWarning)\n"
            "from lorafit.io import adapter_state_dict\nfrom lorafit.peft_format import adapter_state_dict as new\n"
            "assert adapter_state_dict is new\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.splitlines() == ["lorafit.io is now lorafit.peft_format; the old name goes in lorafit 0.2",
                                "lorafit.trainer is now lorafit.hf_trainer; the old name goes in lorafit 0.2"]


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return {m.split(".")[0] for m in out.split()}


def test_import_lorafit_loads_no_optional_dependency():
    heavy = {"transformers", "yaml", "matplotlib", "tqdm", "peft", "datasets"}
    base = _loaded_after("import torch, safetensors.torch")  # torch.hub itself imports tqdm when it is installed
    mine = _loaded_after("import lorafit; lorafit.suggest, lorafit.plan, lorafit.probe")
    assert not (mine - base) & heavy, sorted((mine - base) & heavy)
    assert not mine & {"transformers", "yaml", "matplotlib"}


def test_torch_dynamo_waits_for_the_first_adapter(tmp_path):
    """``import lorafit`` leaves torch._dynamo unloaded (1.4 s); building an adapter, or unpickling one, puts the
    fused path behind torch.compiler.disable (``layers.compile_boundaries``)."""
    code = ("import sys, torch, lorafit\nfrom lorafit import fused, layers\n"
            "assert 'torch._dynamo' not in sys.modules\n"
            "model = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
            "lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=['0']))\n"
            "assert 'torch._dynamo' in sys.modules\n"
            "assert layers.LoraLayer.fused_forward._lorafit_eager and fused.SeededDropout.forward._lorafit_eager\n"
            "assert layers.LoraLayer.fused_forward._torchdynamo_disable  # what torch.compile reads\n"
            "f = layers.LoraLayer.fused_forward\nlayers.compile_boundaries()\n"
            "assert layers.LoraLayer.fused_forward is f  # once\n"
            "torch.save(model, sys.argv[1])")
    saved = tmp_path / "model.pt"
    subprocess.run([sys.executable, "-c", code, str(saved)], check=True, timeout=300)
    code = ("import sys, torch\nfrom lorafit import fused, layers\n"
            "model = torch.load(sys.argv[1], weights_only=False)  # a whole model, unpickled in a fresh process\n"
            "assert layers.LoraLayer.fused_forward._lorafit_eager and fused.SeededDropout.forward._lorafit_eager\n"
            "torch.compile(model, backend='eager')(torch.randn(2, 4)).sum().backward()")
    subprocess.run([sys.executable, "-c", code, str(saved)], check=True, timeout=300)


def test_import_lorafit_works_without_tqdm():
    code = ("import sys; sys.modules['tqdm'] = None\nimport lorafit\n"
            "assert all(callable(f) for f in (lorafit.suggest, lorafit.plan, lorafit.probe))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_60_lines():
    long = [f"{p.relative_to(SRC)}:{line} {name} ({n} lines)" for p in sorted(SRC.rglob("*.py"))
            for name, line, n in _functions(p) if n > MAX_FUNCTION_LINES]
    assert not long, long


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("layout")
    return make_model_dir(d / "m"), make_data(d / "d.jsonl", n=16)


@pytest.mark.parametrize("command,missing", [("train", "matplotlib"), ("train", "yaml"), ("train", "transformers"),
                                             ("probe", "matplotlib"), ("sweep", "tqdm")])
def test_a_command_without_its_extra_says_what_to_install_before_any_work(files, tmp_path, command, missing,
                                                                           monkeypatch, capsys):
    model, data = files
    out = tmp_path / "out"
    argv = [command, "--model", str(model), "--data", str(data), "--output", str(out)]
    if command == "sweep":
        argv += ["--grid", "r=2;targets=qv"]
    if missing == "transformers":  # one case in a new interpreter: the CLI itself imports without the extra
        script = (f"import sys; sys.modules[{missing!r}] = None\nfrom lorafit.cli import main\n"
                  f"sys.exit(main({argv!r}))")
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    else:  # the rest in this process (a new interpreter costs ~2 s each)
        monkeypatch.setitem(sys.modules, missing, None)  # importlib's find_spec now says it is not installed
        code, stdout, stderr = run_cli(capsys, *argv)
    package = {"yaml": "pyyaml"}.get(missing, missing)
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [f"lorafit: error: lorafit {command} needs {package}, which is not "
                                           "installed: pip install 'lorafit[cli]'"]
    assert not out.exists() and stdout == ""


def test_cli_doc_flag_table_is_the_generated_one():
    from lorafit.cli.train import flag_table

    assert flag_table() in (ROOT / "docs" / "cli.md").read_text(encoding="utf-8"), \
        "docs/cli.md's `lorafit train` flag table is stale: paste lorafit.cli.train.flag_table()"
