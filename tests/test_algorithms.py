"""The algorithm registry is the one place an algorithm is defined: the recipe's literal, the backend,
the memory plan's solver state and the card's label all come from it."""

import typing

import pytest

from pipeline.algorithms import ALGORITHMS, Library
from pipeline.quantize import get_backend
from pipeline.quantize.blockwise import BLOCK_SOLVERS
from pipeline.recipe import Recipe, RecipeError, parse_recipe
from pipeline.records import QuantizeReport


def test_the_recipe_accepts_exactly_the_registered_algorithms():
    assert set(typing.get_args(Recipe.model_fields["algorithm"].annotation)) == set(ALGORITHMS)
    with pytest.raises(RecipeError) as err:
        parse_recipe({"name": "r", "model": "tiny:e2b", "scheme": "W4A16", "algorithm": "awq"}, source="r.yaml")
    assert err.value.key == "algorithm" and "allowed: 'rtn', 'autoround', 'gptq', 'opt-rtn' or 'qat-repack'" in str(err.value)


@pytest.mark.parametrize(("name", "library"), [(a.name, lib) for a in ALGORITHMS.values() for lib in a.libraries])
def test_every_pass_builds_its_backend_and_reads_its_options(name, library):
    fields = {"library": library} if library in typing.get_args(Library) else {}
    recipe = parse_recipe({"name": "r", "model": "tiny:e2b", "scheme": "W4A16", "algorithm": name, **fields},
                          source="r.yaml")
    spec = ALGORITHMS[name]
    assert recipe.runs_on == library and recipe.quant_pass is spec.passes[library]
    backend = get_backend(recipe)
    assert type(backend).__name__ == spec.passes[library].backend.rsplit(":", 1)[1] and backend.report == QuantizeReport()
    assert recipe.calibrated == spec.calibrated
    assert (recipe.algorithm_options is None) == (spec.options is None)
    if spec.options is not None:
        assert isinstance(recipe.algorithm_options, spec.options) and recipe.algorithm_options.describe()
    # calibrated passes run in the block driver, which has a solver for each of them
    assert (name in BLOCK_SOLVERS) == spec.calibrated


def test_the_manifest_records_algorithm_and_library_apart():
    from pipeline.rundir import Manifest

    assert {"algorithm", "library"} <= set(Manifest.model_fields) and "backend" not in Manifest.model_fields
