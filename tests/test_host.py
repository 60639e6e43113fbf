"""Plugin host: start-up hook, entry-point finder, switches, post-import callbacks, doctor.

Needs this package and the toy plugins (tests/toy_plugin/) installed in the interpreter
that runs pytest, as .ci/run does. Behaviour is checked in fresh subprocesses of that
interpreter, so every check starts from a clean interpreter start-up.
"""

import json
import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from helpers import toys

toys.ensure_installed()

CLI = Path(sys.executable).parent / "mlx-arch-plugins"
BROKEN_DIST = "mlx-arch-toy-broken 0.2.0"
PURELIB = sysconfig.get_paths()["purelib"]


def run(code, env=None, flags=(), args=(), check=True):
    """Run `python -c code` in a fresh interpreter without the host's switches set."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("MLX_ARCH_PLUGINS")}
    e.update(env or {})
    proc = subprocess.run(
        [sys.executable, *flags, "-c", code, *args],
        capture_output=True,
        text=True,
        env=e,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_json(code, **kw):
    return json.loads(run(code, **kw).stdout.strip().splitlines()[-1])


def write_checkpoint(path, model_type, vocab_words, template_in_config=True, extra=None):
    """Config, weights (with keys sanitize must drop) and a word-level tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True)
    config = {
        "model_type": model_type,
        "vocab_size": len(vocab_words),
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config))
    # toy_mlp weights in every checkpoint: the others must fail before they are read
    from mlx_arch_toy.model import Model, ModelArgs

    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    weights["layers.0.rotary_emb.inv_freq"] = mx.ones((4,))
    weights["lm_head.weight"] = mx.zeros((len(vocab_words), 8))
    weights.update(extra or {})
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    if template_in_config:
        tok_config.update(chat_template_type="toy_chat", tool_parser_type="toy_tools")
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))


WORDS = ["<unk>", "<s>", "</s>", "user:", "assistant:", "hello", "world", "<call>", "</call>"]


@pytest.fixture(scope="module")
def toy_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_checkpoint(root / "toy", "toy_mlp", WORDS)
    write_checkpoint(root / "broken", "toy_broken", WORDS)
    write_checkpoint(root / "missing", "toy_missing_dep", WORDS)
    write_checkpoint(root / "dup", "toy_dup", WORDS)
    write_checkpoint(root / "declared", "toy_mlp", WORDS, template_in_config=False)
    import mlx.core as mx

    refused = {"refused.weight": mx.zeros((2,))}
    write_checkpoint(root / "refused", "toy_mlp", WORDS, extra=refused)
    return root


# --- serving plugin modules under mlx-lm's names ---------------------------------------


@pytest.mark.compat
def test_alias_is_the_plugin_module_itself():
    out = run_json(
        "import json, sys\n"
        "import mlx_lm.models.toy_mlp as m, mlx_arch_toy.model as real\n"
        "import mlx_lm.chat_templates.toy_chat as c, mlx_lm.tool_parsers.toy_tools as t\n"
        "import mlx_arch_toy.chat_template as rc, mlx_arch_toy.tool_parser as rt\n"
        "import mlx_lm.models\n"
        "print(json.dumps([m is real, c is rc, t is rt, m.__spec__.name, m.__name__,\n"
        "  mlx_lm.models.toy_mlp is real, sys.modules['mlx_lm.models.toy_mlp'] is real]))"
    )
    assert out == [True, True, True, "mlx_arch_toy.model", "mlx_arch_toy.model", True, True]


@pytest.mark.compat
def test_load_model_builds_the_toy(toy_ckpts):
    out = run_json(
        "import json, sys\nfrom pathlib import Path\nimport mlx.core as mx\n"
        "from mlx.utils import tree_flatten\nfrom mlx_lm.utils import load_model\n"
        "model, config = load_model(Path(sys.argv[1]))\n"
        "saved = mx.load(sys.argv[1] + '/model.safetensors')\n"
        "params = dict(tree_flatten(model.parameters()))\n"
        "same = all(mx.array_equal(params[k], saved[k]).item() for k in params)\n"
        "logits = model(mx.array([[5, 6]]))\n"
        "print(json.dumps([type(model).__module__, sorted(params), same,\n"
        "  list(logits.shape), config['model_type']]))",
        args=[str(toy_ckpts / "toy")],
    )
    module, names, same, shape, model_type = out
    assert module == "mlx_arch_toy.model"
    # sanitize dropped the rotary table and the tied head; everything else was loaded
    assert names == [
        "embed_tokens.weight",
        "layers.0.down_proj.weight",
        "layers.0.up_proj.weight",
        "norm.weight",
    ]
    assert same is True
    assert shape == [1, 2, len(WORDS)]
    assert model_type == "toy_mlp"


@pytest.mark.compat
def test_disabled_fails_as_stock_does(toy_ckpts):
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom mlx_lm.utils import load_model\n"
        "from mlx_arch_plugins.host import hook as _hook\n"
        "try:\n    load_model(Path(sys.argv[1]))\n"
        "except ValueError as e:\n"
        "    c = e.__cause__ or e.__context__\n"
        "    print(json.dumps([str(e), type(c).__name__, _hook.is_installed()]))\n"
    )
    out = run_json(code, args=[str(toy_ckpts / "toy")], env={"MLX_ARCH_PLUGINS_DISABLE": "1"})
    assert out == ["Model type toy_mlp not supported.", "ModuleNotFoundError", False]
    # "0" means not disabled
    out = run_json(
        "import mlx_lm.models.toy_mlp as m; print('[\"ok\"]')",
        env={"MLX_ARCH_PLUGINS_DISABLE": "0"},
    )
    assert out == ["ok"]


def test_allowlist_limits_served_names():
    code = (
        "import json, importlib\nres = {}\n"
        "for n in ['mlx_lm.models.toy_mlp', 'mlx_lm.chat_templates.toy_chat']:\n"
        "    try:\n        importlib.import_module(n); res[n] = 'ok'\n"
        "    except ImportError as e:\n        res[n] = type(e).__name__\n"
        "print(json.dumps(res))"
    )
    out = run_json(code, env={"MLX_ARCH_PLUGINS": " toy_chat , other"})
    assert out == {
        "mlx_lm.models.toy_mlp": "ModuleNotFoundError",
        "mlx_lm.chat_templates.toy_chat": "ok",
    }
    out = run_json(code, env={"MLX_ARCH_PLUGINS": ""})  # empty: everything allowed
    assert set(out.values()) == {"ok"}


@pytest.mark.compat
def test_stock_name_is_never_replaced():
    out = run_json(
        "import json, sys, mlx_lm, mlx_lm.models.llama as m\n"
        "print(json.dumps([m.__file__.startswith(mlx_lm.__path__[0]),\n"
        "  'mlx_arch_toy.not_llama' in sys.modules]))"
    )
    assert out == [True, False]


def test_metadata_is_read_only_on_a_miss():
    out = run_json(
        "import json\nfrom mlx_arch_plugins.host import hook as _hook\n"
        "import mlx_lm.utils, mlx_lm.models.llama\nbefore = _hook._entries is None\n"
        "import mlx_lm.models.toy_mlp\nprint(json.dumps([before, _hook._entries is None]))"
    )
    assert out == [True, False]


def test_startup_imports_nothing_heavy():
    proc = run("pass", flags=["-X", "importtime"])
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "mlx_arch_plugins.host.hook" in imported  # the hook did run at start-up
    for heavy in ("importlib.metadata", "mlx", "mlx_lm", "mlx_arch_toy", "warnings"):
        assert heavy not in imported


def test_start_file_names_the_startup_callable():
    # What Python >= 3.15 (PEP 829) does with the .start file: resolve and call each line.
    import pkgutil

    from mlx_arch_plugins.host import hook as _hook

    files = {f.name: f for f in metadata.distribution("mlx-arch-plugins").files}
    lines = files["mlx_arch_plugins.start"].read_text().split()
    assert [pkgutil.resolve_name(line) for line in lines] == [_hook._startup]
    # What site does with the .pth file: exec its import line.
    out = run_json(
        "import json, sys\nfor line in open(sys.argv[1]):\n"
        "    if line.startswith('import'):\n        exec(line)\n"
        "from mlx_arch_plugins.host import hook as _hook\nprint(json.dumps(_hook.status()['reason']))",
        flags=["-S"],
        env={"PYTHONPATH": PURELIB},
        args=[str(files["mlx_arch_plugins.pth"].locate())],
    )
    assert out == "active (installed by start-up file)"


def test_startup_never_raises():
    out = run_json(
        "import json\nfrom mlx_arch_plugins.host import hook as _hook\n"
        "def boom(**kw):\n    raise RuntimeError('x')\n"
        "_hook.install = boom\n_hook._startup()\nprint(json.dumps('survived'))"
    )
    assert out == "survived"


# --- broken plugins ----------------------------------------------------------------------


@pytest.mark.compat
def test_broken_plugin_does_not_break_startup_or_others():
    proc = run("import mlx_lm.models.toy_mlp, mlx_lm.tool_parsers.toy_tools")
    assert proc.stderr == ""
    proc = run("pass")
    assert proc.stdout == proc.stderr == ""


LOAD_ERR = (
    "import json, sys\nfrom pathlib import Path\nfrom mlx_lm.utils import load_model\n"
    "try:\n    load_model(Path(sys.argv[1]))\n"
    "except ValueError as e:\n"
    "    c = e.__cause__ or e.__context__\n"
    "    print(json.dumps([str(e), type(c).__name__, str(c), type(c.__cause__).__name__]))\n"
)


@pytest.mark.compat
def test_broken_plugin_reports_error_and_distribution(toy_ckpts):
    msg, kind, cause, root = run_json(LOAD_ERR, args=[str(toy_ckpts / "broken")])
    assert msg == "Model type toy_broken not supported."  # stock's wrapper, unchanged
    assert kind == "PluginImportError"
    assert "toy plugin fails on purpose" in cause
    assert BROKEN_DIST in cause and "mlx_arch_toy_broken.boom" in cause
    assert root == "RuntimeError"


@pytest.mark.compat
def test_plugin_with_missing_dependency_reports_it(toy_ckpts):
    msg, kind, cause, root = run_json(LOAD_ERR, args=[str(toy_ckpts / "missing")])
    assert kind == "PluginImportError"
    assert "No module named 'not_a_real_dependency_xyz'" in cause
    assert BROKEN_DIST in cause
    assert root == "ModuleNotFoundError"


@pytest.mark.compat
def test_generate_cli_shows_real_error_and_distribution(toy_ckpts):
    proc = run(
        "from mlx_lm.generate import main; main()",
        args=["--model", str(toy_ckpts / "broken"), "--prompt", "hello", "--max-tokens", "1"],
        check=False,
    )
    assert proc.returncode != 0
    assert "RuntimeError: toy plugin fails on purpose" in proc.stderr
    assert BROKEN_DIST in proc.stderr
    assert "Model type toy_broken not supported." in proc.stderr


def test_name_registered_twice_is_an_error(toy_ckpts):
    msg, kind, cause, _ = run_json(LOAD_ERR, args=[str(toy_ckpts / "dup")])
    assert kind == "PluginImportError"
    assert "more than one distribution" in cause
    assert "mlx-arch-toy 0.1.0" in cause and BROKEN_DIST in cause


# --- the unchanged mlx-lm entry points ----------------------------------------------------


@pytest.mark.compat
def test_load_wires_plugin_chat_template_and_tool_parser(toy_ckpts):
    out = run_json(
        "import json, sys\nfrom mlx_lm import load\nimport mlx_arch_toy.tool_parser as tp\n"
        "model, tok = load(sys.argv[1])\n"
        "msgs = [{'role': 'user', 'content': 'hello world'}]\n"
        "ids = tok.apply_chat_template(msgs, add_generation_prompt=True)\n"
        "print(json.dumps([type(model).__module__, tok.decode(ids),\n"
        "  tok.tool_parser is tp.parse_tool_call, tok.tool_call_start, tok.tool_call_end]))",
        args=[str(toy_ckpts / "toy")],
    )
    assert out == [
        "mlx_arch_toy.model",
        "<s> user: hello world assistant:",  # the toy template, word-split by the toy vocab
        True,
        "<call>",
        "</call>",
    ]


@pytest.mark.compat
def test_architecture_declarations_reach_the_host(toy_ckpts, tmp_path):
    # What a third-party architecture declares in its model module, with no edit here:
    # tokenizer defaults (no template named by the checkpoint), a cache class a
    # prompt-cache file names (loaded before any model), a checkpoint error that gets
    # its shard file, and a convert hook.
    out = run_json(
        "import json, sys\nimport mlx.core as mx\n"
        "from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache\n"
        "from mlx_arch_toy.model import ToyCache\n"
        "c = ToyCache(); c.update_and_fetch(mx.ones((1, 1, 2, 4)), mx.ones((1, 1, 2, 4)))\n"
        "save_prompt_cache(sys.argv[2], [c])\n"
        "print(json.dumps(type(load_prompt_cache(sys.argv[2])[0]).__name__))",
        args=[str(toy_ckpts / "declared"), str(tmp_path / "cache.safetensors")],
    )
    assert out == "ToyCache"
    out = run_json(
        "import json, sys\nimport mlx_lm.models.cache as stock\n"
        "print(json.dumps(getattr(stock, 'ToyCache', None) is None))\n"
        "from mlx_lm import load\nimport mlx_lm.utils as mu\nimport mlx_arch_toy.tool_parser as tp\n"
        "model, tok = load(sys.argv[1])\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'hello'}],\n"
        "                              add_generation_prompt=True)\n"
        "try:\n    load(sys.argv[2]); err = None\nexcept ValueError as e:\n    err = str(e)\n"
        "dense = mu.dequantize_model(model)\n"
        "print(json.dumps([tok.decode(ids), tok.tool_parser is tp.parse_tool_call, err,\n"
        "  getattr(dense, 'toy_dequantized', False)]))",
        args=[str(toy_ckpts / "declared"), str(toy_ckpts / "refused")],
    )
    assert out[0] == "<s> user: hello assistant:" and out[1] is True
    assert "'refused.weight': the toy refuses this tensor" in out[2]
    assert str(toy_ckpts / "refused" / "model.safetensors") in out[2]
    assert out[3] is True


@pytest.mark.compat
def test_generate_cli_runs_the_toy(toy_ckpts):
    proc = run(
        "from mlx_lm.generate import main; main()",
        args=["--model", str(toy_ckpts / "toy"), "--prompt", "hello", "--max-tokens", "3"],
    )
    assert "Generation:" in proc.stdout and "tokens-per-sec" in proc.stdout
    assert "Prompt: 4 tokens" in proc.stdout  # <s> user: hello assistant:


# --- explicit install() / uninstall() and the post-import callbacks -----------------------


@pytest.mark.compat
def test_python_S_needs_and_gets_explicit_install():
    code = (
        "import json, sys, importlib\nimport mlx_arch_plugins as p\nfrom mlx_arch_plugins.host import hook as _hook\n"
        "def ok():\n"
        "    try:\n        importlib.import_module('mlx_lm.models.toy_mlp'); return True\n"
        "    except ImportError:\n        return False\n"
        "def count():\n"
        "    return [sys.meta_path.count(_hook.post_import_finder),\n"
        "            sys.meta_path.count(_hook.plugin_finder)]\n"
        "res = [ok(), count(), p.install(), p.install(), count(),\n"
        "       sys.meta_path[0] is _hook.post_import_finder,\n"
        "       sys.meta_path[-1] is _hook.plugin_finder, ok()]\n"
        "p.uninstall(); p.uninstall()\n"
        "res += [count(), 'mlx_lm.models.toy_mlp' in sys.modules, ok()]\n"
        "print(json.dumps(res))"
    )
    out = run_json(code, flags=["-S"], env={"PYTHONPATH": PURELIB})
    assert out == [False, [0, 0], True, True, [1, 1], True, True, True, [0, 0], False, False]


FAKE_PATCHES = (
    "import json, sys, types, warnings\n"
    "calls = []\n"
    "fake = types.ModuleType('mlx_arch_plugins.host.patches')\n"
    "def on_import(name, module):\n"
    "    calls.append([name, module.__name__, len(vars(module))])\n"
    "    if name == 'mlx_lm.generate' and '--fail' in sys.argv:\n"
    "        raise RuntimeError('patch exploded')\n"
    "fake.on_import = on_import\n"
    "fake.undo_all = lambda: calls.append(['undo_all'])\n"
    "sys.modules['mlx_arch_plugins.host.patches'] = fake\n"
)


@pytest.mark.compat
def test_post_import_callbacks_run_once_after_each_module():
    out = run_json(
        FAKE_PATCHES + "import mlx_lm.generate, mlx_lm.convert, mlx_lm.sample_utils\n"
        "import mlx_lm.utils\nfrom mlx_arch_plugins.host import hook as _hook\n_hook.install()\n"
        "loader = type(mlx_lm.utils.__loader__).__name__\n"
        "spec_loader = type(mlx_lm.utils.__spec__.loader).__name__\n"
        "sizes = {n: len(vars(sys.modules[n])) for n in _hook.PATCHED if n in sys.modules}\n"
        "_hook.uninstall()\nprint(json.dumps([calls, loader, spec_loader, sizes]))"
    )
    calls, loader, spec_loader, sizes = out
    names = [c[0] for c in calls]
    expected = {
        "mlx_lm.models.base",
        "mlx_lm.models.cache",
        "mlx_lm.tokenizer_utils",
        "mlx_lm.utils",
        "mlx_lm.generate",
        "mlx_lm.convert",
    }
    assert sorted(names[:-1]) == sorted(expected)  # each once; sample_utils never
    assert names[-1] == "undo_all"  # uninstall() undid the patches
    # called with the module itself, after its body ran to the end
    assert all(c[1] == c[0] and c[2] == sizes[c[0]] for c in calls[:-1])
    assert names.index("mlx_lm.utils") < names.index("mlx_lm.generate")
    assert loader == spec_loader == "SourceFileLoader"  # the wrapper does not stay


@pytest.mark.compat
def test_install_calls_back_for_modules_imported_before_it():
    calls, before = run_json(
        FAKE_PATCHES + "import mlx_lm.utils\nassert calls == []\n"
        "import mlx_arch_plugins\nfrom mlx_arch_plugins.host.hook import PATCHED\n"
        "before = [n for n in PATCHED if n in sys.modules]\n"
        "mlx_arch_plugins.install(); mlx_arch_plugins.install()\n"
        "print(json.dumps([[c[0] for c in calls], before]))",
        flags=["-S"],
        env={"PYTHONPATH": PURELIB},
    )
    assert "mlx_lm.utils" in before and "mlx_lm.server" not in before
    assert calls == before  # each once, in PATCHED's order


# A second copy of the hook (as when a source tree on sys.path is imported beside the
# installed package) loaded under another name; its finders carry the same mark.
SECOND_COPY = (
    "import importlib.util, sys, json\n"
    "from mlx_arch_plugins.host import hook as first\n"
    "spec = importlib.util.spec_from_file_location('second_hook', first.__file__)\n"
    "second = importlib.util.module_from_spec(spec); spec.loader.exec_module(second)\n"
)


def test_two_copies_of_the_post_import_finder_do_not_ask_each_other():
    out = run_json(
        SECOND_COPY + "first.install()\n"
        "sys.meta_path.insert(0, second.post_import_finder)  # both copies' finders in place\n"
        "import mlx_lm.models.cache  # recursed without end before the fix\n"
        "print(json.dumps(type(mlx_lm.models.cache.__loader__).__name__))"
    )
    assert out == "SourceFileLoader"


def test_the_copy_that_installs_last_serves_alone():
    before, after = run_json(
        SECOND_COPY + "first.install()\nbefore = [type(f).__module__ for f in sys.meta_path "
        "if hasattr(f, 'mlx_arch_plugins_finder')]\n"
        "second.install()\nafter = [type(f).__module__ for f in sys.meta_path "
        "if hasattr(f, 'mlx_arch_plugins_finder')]\n"
        "import mlx_lm.models.cache\nprint(json.dumps([before, after]))"
    )
    assert before == ["mlx_arch_plugins.host.hook"] * 2
    assert after == ["second_hook"] * 2


def test_failing_patch_warns_and_import_still_works():
    proc = run(
        FAKE_PATCHES + "import mlx_lm.generate\nprint(json.dumps(len(calls)))", args=["--fail"]
    )
    assert "RuntimeWarning" in proc.stderr and "patch exploded" in proc.stderr
    assert "mlx_lm.generate may run unpatched" in proc.stderr
    assert json.loads(proc.stdout) >= 5


def test_disabled_switch_also_turns_off_callbacks():
    out = run_json(
        FAKE_PATCHES + "import mlx_lm.utils\nprint(json.dumps(calls))",
        env={"MLX_ARCH_PLUGINS_DISABLE": "1"},
    )
    assert out == []


# --- doctor and the command line ------------------------------------------------------------


def doctor_json(env=None):
    proc = subprocess.run(
        [str(CLI), "doctor", "--json"],
        capture_output=True,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("MLX_ARCH_PLUGINS")},
            **(env or {}),
        },
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def entry(report, group, name):
    found = [e for e in report["entries"] if e["group"] == group and e["name"] == name]
    assert found, f"{group}:{name} not in doctor output"
    return found


@pytest.mark.compat
def test_doctor_json_reports_host_versions_and_entries():
    report = doctor_json()
    assert report["schema"] == 1
    assert set(report) == {
        "schema",
        "package",
        "python",
        "hook",
        "versions",
        "mlx",
        "entries",
        "ok",
    }
    assert report["hook"]["active"] is True
    assert report["hook"]["reason"] == "active (installed by start-up file)"
    names = sorted(Path(f["path"]).name for f in report["hook"]["startup_files"])
    assert names == ["mlx_arch_plugins.pth", "mlx_arch_plugins.start"]
    assert all(f["exists"] for f in report["hook"]["startup_files"])
    for dist in ("mlx", "mlx-lm", "transformers"):
        assert report["versions"][dist] == metadata.version(dist)
    import mlx.core as mx

    assert report["mlx"]["default_device"] == str(mx.default_device())
    assert report["mlx"]["backend"] in ("cpu", "metal", "cuda")
    models = "mlx_arch_plugins.models"
    (toy,) = entry(report, models, "toy_mlp")
    assert toy == {
        "group": models,
        "name": "toy_mlp",
        "module": "mlx_arch_toy.model",
        "alias": "mlx_lm.models.toy_mlp",
        "distribution": "mlx-arch-toy",
        "version": "0.1.0",
        "status": "ok",
        "detail": None,
    }
    (broken,) = entry(report, models, "toy_broken")
    assert broken["status"] == "error" and "toy plugin fails on purpose" in broken["detail"]
    assert broken["distribution"] == "mlx-arch-toy-broken"
    assert entry(report, models, "llama")[0]["status"] == "stock"
    assert {e["status"] for e in entry(report, models, "toy_dup")} == {"conflict"}
    assert entry(report, "mlx_arch_plugins.chat_templates", "toy_chat")[0]["status"] == "ok"
    assert entry(report, "mlx_arch_plugins.tool_parsers", "toy_tools")[0]["status"] == "ok"
    own = entry(report, models, "deepseek_v4")[0]
    assert (own["distribution"], own["module"]) == (
        "mlx-arch-plugins",
        "mlx_arch_plugins.deepseek_v4.model",
    )
    assert report["ok"] is False  # the broken toy is installed


def test_doctor_json_explains_disabled_and_allowlist():
    report = doctor_json({"MLX_ARCH_PLUGINS_DISABLE": "1"})
    assert report["hook"]["active"] is False
    assert "MLX_ARCH_PLUGINS_DISABLE=1" in report["hook"]["reason"]
    assert entry(report, "mlx_arch_plugins.models", "toy_mlp")[0]["status"] == "disabled"
    report = doctor_json({"MLX_ARCH_PLUGINS": "toy_chat"})
    assert report["hook"]["allowlist"] == ["toy_chat"]
    assert entry(report, "mlx_arch_plugins.models", "toy_mlp")[0]["status"] == "not-allowed"
    assert entry(report, "mlx_arch_plugins.chat_templates", "toy_chat")[0]["status"] == "ok"


def test_doctor_text_and_help():
    proc = run("from mlx_arch_plugins.host.cli import main; raise SystemExit(main(['doctor']))")
    assert "hook: ACTIVE" in proc.stdout
    assert "toy plugin fails on purpose" in proc.stdout
    proc = run("", flags=["-m", "mlx_arch_plugins", "--help"])
    for command in ("doctor", "make-tiny", "demo"):
        assert command in proc.stdout


def test_cli_delegates_and_reports_missing_modules(monkeypatch, capsys, tmp_path):
    from mlx_arch_plugins.host import cli

    (tmp_path / "fake_cmd.py").write_text(
        "seen = []\ndef main(argv):\n    seen.append(argv)\n    return 7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.DELEGATED, "demo", ("fake_cmd", "x"))
    monkeypatch.setitem(cli.DELEGATED, "make-tiny", ("no_such_module_xyz", "x"))
    assert cli.main(["demo", "--help", "a"]) == 7
    import fake_cmd

    assert fake_cmd.seen == [["--help", "a"]]
    assert cli.main(["make-tiny"]) == 2
    assert "'make-tiny' command is not available" in capsys.readouterr().err
