"""The package's layers (docs/architecture.md): a module imports only from its own layer
or a lower one, read from the source's import statements (top level and deferred)."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "diffusion_jax"

# Lowest first. A name is a subpackage or module of diffusion_jax; the longest matching
# prefix of a module's dotted name decides its layer.
LAYERS = (
    ("paths", "reporting", "distributed", "torch_archive"),
    ("core",),
    ("models",),
    ("data",),
    ("evaluation.inception", "evaluation.metrics", "evaluation.recognisability"),
    ("sampling",),
    ("configs",),
    ("config_lib", "state", "checkpoints", "ema", "noisy_classifier"),
    ("run",),
    ("training",),
    ("evaluation",),
    ("tools",),
    ("main",),
)


def layer_of(dotted: str) -> int:
  """The layer of `dotted` (relative to diffusion_jax, e.g. "core.objective.learned")."""
  best, rank = "", None
  for i, names in enumerate(LAYERS):
    for name in names:
      if (dotted == name or dotted.startswith(name + ".")) and len(name) > len(best):
        best, rank = name, i
  if rank is None:
    raise AssertionError(f"diffusion_jax.{dotted} is in no layer of tests/test_layers.py")
  return rank


def imported(path: pathlib.Path) -> set[str]:
  """The diffusion_jax modules `path` imports, relative to diffusion_jax."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusion_jax"):
      base = node.module[len("diffusion_jax."):]
      for alias in node.names:  # a submodule by name, else a name from the module
        sub = f"{base}.{alias.name}".lstrip(".")
        found.add(sub if _is_module(sub) else base)
    elif isinstance(node, ast.Import):
      found.update(a.name[len("diffusion_jax."):] for a in node.names
                   if a.name.startswith("diffusion_jax."))
  return found


def _is_module(dotted: str) -> bool:
  path = PACKAGE.joinpath(*dotted.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    dotted = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    if dotted != "__init__":
      yield path, dotted.removesuffix(".__init__")


def test_no_module_imports_a_higher_layer():
  upward = [f"{dotted} imports {target}" for path, dotted in modules()
            for target in imported(path) if layer_of(target) > layer_of(dotted)]
  assert not upward, upward


def test_run_convert_and_sampling_do_not_import_training():
  users = [(dotted, imported(path)) for path, dotted in modules()
           if dotted in ("run", "tools.convert") or dotted.startswith("sampling")]
  assert {d for d, _ in users} >= {"run", "tools.convert", "sampling.samplers"}
  assert not [(d, t) for d, targets in users for t in targets if t.startswith("training")]


def test_the_check_sees_an_upward_import(tmp_path):
  module = tmp_path / "probe.py"
  module.write_text("def f():\n  from diffusion_jax.training import train\n"
                    "from diffusion_jax import paths\nfrom diffusion_jax.core.diffusion import q\n")
  assert imported(module) == {"training.train", "paths", "core.diffusion"}
  assert layer_of("training.train") > layer_of("sampling.samplers")
