"""The public surface is deliberate: pinned names, each with a docstring and an example."""

import inspect

import jaxflat

PUBLIC = {
    "LayoutEntry",
    "LoadError",
    "Restructure",
    "clear_caches",
    "destructure",
    "isleaf",
    "isnumeric",
    "load",
    "loadmodel",
    "modules",
    "register_leaf",
    "register_trainable",
    "save",
    "state",
    "summary",
    "trainable",
}


def test_all_is_pinned():
    assert set(jaxflat.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(jaxflat, name), name


def test_every_public_function_has_a_docstring_with_an_example():
    for name in PUBLIC - {"LayoutEntry"}:
        doc = inspect.getdoc(getattr(jaxflat, name))
        assert doc, f"{name} has no docstring"
        assert ">>>" in doc, f"{name}'s docstring has no example"


def test_load_error_is_a_value_error():
    assert issubclass(jaxflat.LoadError, ValueError)


def test_tree_argument_is_positional_only():
    for fn in (jaxflat.destructure, jaxflat.state, jaxflat.modules, jaxflat.summary):
        first = next(iter(inspect.signature(fn).parameters.values()))
        assert first.kind is inspect.Parameter.POSITIONAL_ONLY, fn.__name__


def test_version():
    assert isinstance(jaxflat.__version__, str) and jaxflat.__version__
