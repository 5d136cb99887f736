"""Recipes: strict typed loading, every shipped recipe, overrides, YAML round trip."""

import dataclasses
import subprocess
import sys

import pytest

from kseg.training.recipe import (
    MODELS,
    Recipe,
    RecipeError,
    apply_overrides,
    dump_recipe,
    find_recipe,
    list_recipes,
    load_recipe,
    parse_yaml,
    recipe_from_dict,
    recipe_to_dict,
    save_recipe,
)

PAPER_RECIPES = {
    "pan_r101-os16_4xb4-voc-512": ("pan", "voc_aug", (512, 512), 4e-3),
    "pan_r101-os16_4xb4-cityscapes-768": ("pan", "cityscapes", (768, 768), 4e-3),
    "exfuse_x101-32x4d-lr_4xb4-voc-512": ("exfuse", "voc_aug", (512, 512), 1e-2),
    "fcn_r101-os16_4xb4-voc-512": ("fcn", "voc_aug", (512, 512), 4e-3),
    "gcn_x101-32x4d_4xb4-voc-512": ("gcn", "voc_aug", (512, 512), 1e-2),
    "segmodel_r101-os16_4xb4-voc-512": ("segmodel", "voc_aug", (512, 512), 1e-2),
    "segmodel_r101-os16_4xb4-cityscapes-768": (
        "segmodel",
        "cityscapes",
        (768, 768),
        1e-2,
    ),
}


def test_every_recipe_file_loads_and_validates():
    recipes = list_recipes()
    assert "quickstart" in recipes
    assert set(PAPER_RECIPES) <= set(recipes)
    for name, path in recipes.items():
        recipe = load_recipe(path)
        assert recipe.name == name == path.stem
        assert recipe.model.name in MODELS
        assert recipe.description
        # Written back out and read again, nothing changes.
        assert recipe_from_dict(parse_yaml(dump_recipe(recipe))) == recipe


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipes_carry_the_papers_hyperparameters(name):
    model, dataset, crop, learning_rate = PAPER_RECIPES[name]
    recipe = load_recipe(name)
    assert recipe.model.name == model
    assert recipe.data.dataset == dataset
    assert recipe.data.crop_size == crop
    assert recipe.data.scale_range == (0.5, 2.0)
    assert recipe.data.flip
    assert recipe.optimizer.name == "sgd"
    assert recipe.optimizer.learning_rate == pytest.approx(learning_rate)
    assert recipe.optimizer.momentum == 0.9
    assert recipe.optimizer.weight_decay == pytest.approx(1e-4)
    assert recipe.schedule.power == 0.9
    assert recipe.schedule.warmup_steps > 0
    assert recipe.train.batch_size == 16
    # The file name states devices x per-device batch: 4xb4 = 16.
    assert "_4xb4-" in name and recipe.train.strategy == "mirrored"


def test_exfuse_recipe_weights_the_ecre_auxiliary_loss():
    recipe = load_recipe("exfuse_x101-32x4d-lr_4xb4-voc-512")
    assert recipe.loss.aux_weights == {"ecre_logits": 1.0}
    assert recipe.model.kwargs["dap"] and recipe.model.kwargs["seb"]


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
def test_segmodel_recipes_keep_ohem_and_aspect_jitter(dataset):
    crop = 512 if dataset == "voc" else 768
    recipe = load_recipe(f"segmodel_r101-os16_4xb4-{dataset}-{crop}")
    assert recipe.loss.top_k_percent_pixels == 0.5
    assert recipe.data.aspect_range == (0.8, 1.25)
    assert recipe.data.color_jitter is not None
    assert all(recipe.model.kwargs[k] for k in ("context_crf", "guidance_crf"))


def test_quickstart_is_the_synthetic_recipe():
    recipe = load_recipe("quickstart")
    assert recipe.data.dataset == "synthetic"
    assert recipe.train.strategy == "one_device"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(
        RecipeError, match=r"'train\.bach_size'.*did you mean 'train\.batch_size'"
    ):
        recipe_from_dict({"train": {"bach_size": 4}})
    with pytest.raises(
        RecipeError, match=r"unknown recipe key 'modle'.*did you mean 'model'"
    ):
        recipe_from_dict({"modle": {"name": "pan"}})


def test_unknown_model_kwarg_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: pan\n  kwargs:\n    filtres: 16\n")
    with pytest.raises(
        RecipeError,
        match=r"bad\.yaml.*'model\.kwargs\.filtres'.*'model\.kwargs\.filters'",
    ):
        load_recipe(path)


def test_unknown_backbone_kwarg_and_names_are_errors():
    with pytest.raises(RecipeError, match=r"backbone\.kwargs\.block_count"):
        recipe_from_dict({"backbone": {"kwargs": {"block_count": [1, 1, 1, 1]}}})
    with pytest.raises(
        RecipeError, match=r"model\.name: 'pann' is not one of .*did you mean 'pan'"
    ):
        recipe_from_dict({"model": {"name": "pann"}})
    with pytest.raises(RecipeError, match=r"train\.strategy: 'mirored'"):
        recipe_from_dict({"train": {"strategy": "mirored"}})


@pytest.mark.parametrize(
    "values, match",
    [
        ({"train": {"epochs": "ten"}}, r"train\.epochs: expected an int, got 'ten'"),
        ({"train": {"epochs": 2.5}}, r"train\.epochs: expected an int"),
        (
            {"train": {"jit_compile": "yes"}},
            r"train\.jit_compile: expected true or false",
        ),
        ({"data": {"crop_size": [512]}}, r"data\.crop_size: expected 2 values"),
        ({"data": {"crop_size": 512}}, r"data\.crop_size: expected a list"),
        ({"optimizer": {"learning_rate": "fast"}}, r"optimizer\.learning_rate"),
        ({"loss": {"top_k_percent_pixels": 1.5}}, r"loss\.top_k_percent_pixels"),
        ({"train": {"batch_size": 0}}, r"train\.batch_size: must be > 0"),
        ({"data": {"scale_range": [2.0, 0.5]}}, r"data\.scale_range"),
        ({"data": {"dataset": "folder"}}, r"data\.num_classes: required"),
        ({"loss": {"aux_weights": {"logits": 0.5}}}, r"loss\.aux_weights\.logits"),
        ({"eval": {"scales": []}}, r"eval\.scales"),
        ({"model": "pan"}, r"model: expected a mapping"),
    ],
)
def test_badly_typed_values_name_the_key(values, match):
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(values)


def test_yaml_numbers_follow_yaml_1_2():
    # PyYAML alone reads `1e-4` as a string.
    recipe = recipe_from_dict(parse_yaml("optimizer:\n  weight_decay: 1e-4\n"))
    assert recipe.optimizer.weight_decay == pytest.approx(1e-4)


def test_overrides_are_typed_and_checked():
    recipe = load_recipe("quickstart")
    changed = apply_overrides(
        recipe,
        [
            "train.epochs=3",
            "model.kwargs.filters=24",
            "data.crop_size=[48, 48]",
            "optimizer.learning_rate=5e-4",
            "data.color_jitter=[0.2, 0.2, 0.2]",
            "loss.class_weights=null",
            "train.synchronized_bn=true",
            "name=renamed",
        ],
    )
    assert changed.train.epochs == 3
    assert changed.model.kwargs["filters"] == 24
    assert changed.data.crop_size == (48, 48)
    assert changed.optimizer.learning_rate == pytest.approx(5e-4)
    assert changed.data.color_jitter == (0.2, 0.2, 0.2)
    assert changed.train.synchronized_bn is True
    assert changed.name == "renamed"
    # The original is untouched.
    assert recipe.train.epochs != 3 and recipe.model.kwargs.get("filters") != 24


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.epoch=3", r"'train\.epoch'.*did you mean 'train\.epochs'"),
        ("train.epochs=three", r"train\.epochs: expected an int, got 'three'"),
        ("model.kwargs.filtrs=3", r"'model\.kwargs\.filtrs'.*'model\.kwargs\.filters'"),
        (
            "train.epochs.value=3",
            r"train\.epochs: is a int value, it has no key 'value'",
        ),
        ("trainepochs", r"must look like key\.path=value"),
        ("data.crop_size=[1, 2, 3]", r"data\.crop_size: expected 2 values"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(RecipeError, match=match):
        apply_overrides(load_recipe("quickstart"), [override])


def test_recipes_are_found_through_the_environment(tmp_path, monkeypatch):
    recipe = dataclasses.replace(load_recipe("quickstart"), name="mine")
    save_recipe(recipe, tmp_path / "mine.yaml")
    with pytest.raises(FileExistsError):
        save_recipe(recipe, tmp_path / "mine.yaml")
    with pytest.raises(FileNotFoundError, match="KSEG_RECIPES"):
        find_recipe("mine")
    monkeypatch.setenv("KSEG_RECIPES", str(tmp_path))
    assert find_recipe("mine") == tmp_path / "mine.yaml"
    assert load_recipe("mine") == recipe
    assert "quickstart" in list_recipes()
    with pytest.raises(FileNotFoundError, match="did you mean 'quickstart'"):
        find_recipe("quikstart")


def test_recipe_defaults_dump_every_field():
    values = recipe_to_dict(Recipe())
    assert set(values) == {f.name for f in dataclasses.fields(Recipe)}
    assert values["train"]["strategy"] == "one_device"


def test_a_key_given_twice_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(RecipeError, match=r"twice.yaml: invalid YAML.*duplicate key"):
        load_recipe(path)


def test_an_empty_recipe_file_is_an_error_not_the_default_recipe(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(RecipeError, match=r"empty.yaml: the recipe file is empty"):
        load_recipe(path)


def test_the_task_must_fit_the_model():
    recipe = load_recipe("quickstart")
    assert recipe.task == "semantic"
    with pytest.raises(RecipeError, match="task: model 'pan' is a semantic model"):
        apply_overrides(recipe, ["task=instance"])


def test_instance_loss_weights_reach_the_model_and_others_are_refused():
    recipe = apply_overrides(
        load_recipe("panet_quickstart"),
        ["loss.weights={mask: 2.0, rpn_box: 0.5}"],
    )
    assert recipe.loss.weights == {"mask": 2.0, "rpn_box": 0.5}
    with pytest.raises(RecipeError, match=r"loss\.weights\.mask_loss.*did you mean"):
        apply_overrides(recipe, ["loss.weights={mask_loss: 1.0}"])
    with pytest.raises(RecipeError, match=r"loss\.weights\.mask: must be >= 0"):
        apply_overrides(recipe, ["loss.weights={mask: -1.0}"])
    with pytest.raises(RecipeError, match=r"loss\.weights\.mask: must be a finite"):
        apply_overrides(recipe, ["loss.weights={mask: .nan}"])
    # The semantic settings are refused in an instance recipe, never ignored.
    with pytest.raises(RecipeError, match=r"loss\.top_k_percent_pixels: a semantic"):
        apply_overrides(recipe, ["loss.top_k_percent_pixels=0.5"])
    with pytest.raises(RecipeError, match=r"loss\.aux_weights: a semantic"):
        apply_overrides(recipe, ["loss.aux_weights={ecre_logits: 0.5}"])
    with pytest.raises(RecipeError, match=r"loss\.weights: an instance"):
        apply_overrides(load_recipe("quickstart"), ["loss.weights={mask: 1.0}"])
    with pytest.raises(RecipeError, match=r"model\.kwargs\.loss_weights"):
        apply_overrides(recipe, ["model.kwargs.loss_weights={mask: 1.0}"])


def test_instance_tunables_are_recipe_fields():
    recipe = apply_overrides(
        load_recipe("panet_quickstart"),
        [
            "model.kwargs.anchor_sizes=[8, 16, 32, 64, 128]",
            "model.kwargs.aspect_ratios=[1.0]",
            "model.kwargs.rpn_positive_iou=0.6",
            "model.kwargs.rpn_negative_iou=0.2",
            "model.kwargs.roi_foreground_iou=0.6",
            "model.kwargs.mask_size=14",
        ],
    )
    assert recipe.model.kwargs["anchor_sizes"] == [8, 16, 32, 64, 128]
    assert recipe.model.kwargs["mask_size"] == 14


@pytest.mark.parametrize(
    "override, match",
    [
        ("optimizer.learning_rate=.nan", r"optimizer\.learning_rate: must be a fini"),
        ("optimizer.learning_rate=-.inf", r"optimizer\.learning_rate: must be a fini"),
        ("optimizer.weight_decay=.nan", r"optimizer\.weight_decay: must be a finite"),
        ("optimizer.momentum=.nan", r"optimizer\.momentum: must be a finite"),
        ("schedule.power=.inf", r"schedule\.power: must be a finite"),
        ("schedule.step_fractions=[0.5, .nan]", r"schedule\.step_fractions\[1\]: must"),
        ("eval.scales=[.nan]", r"eval\.scales\[0\]: must be a finite"),
        ("data.scale_range=[.nan, 1]", r"data\.scale_range\[0\]: must be a finite"),
        ("model.kwargs.filters=.nan", r"model\.kwargs\.filters: must be a finite"),
        ("model.kwargs.x=[1, [2, .inf]]", r"model\.kwargs\.x\[1\]\[1\]: must be a f"),
        ("backbone.kwargs.widths=[.nan]", r"backbone\.kwargs\.widths\[0\]: must be"),
    ],
)
def test_non_finite_numbers_are_refused_in_every_field(override, match):
    # A NaN learning rate trained a NaN model that "evaluated" at 13% mIoU.
    with pytest.raises(RecipeError, match=rf"--set: {match}"):
        apply_overrides(load_recipe("quickstart"), [override])


def test_a_mask_size_below_two_is_refused_up_front():
    # The instance pipeline needs 2x2 mask crops; it failed only once the
    # run directory existed.
    recipe = load_recipe("panet_quickstart")
    with pytest.raises(RecipeError, match="data.mask_size: .* at least 2, got 1"):
        apply_overrides(recipe, ["data.mask_size=1"])
    assert apply_overrides(recipe, ["data.mask_size=2"]).data.mask_size == 2


def _nested_aliases(levels, width=9):
    """YAML of `levels` lists, each holding the one before `width` times:
    a few hundred bytes that expand to `width ** levels` strings."""
    lines = [f"    - &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"    - &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines)


def test_nested_yaml_aliases_are_refused_at_once(tmp_path):
    # 7 levels: 4.8 million strings once expanded (the 9 levels grew
    # to 3.3 GB); `filters` is a real PAN argument, so only the size stops it.
    path = tmp_path / "aliases.yaml"
    text = f"model:\n  name: pan\n  kwargs:\n    filters:\n{_nested_aliases(7)}\n"
    path.write_text(text)
    assert len(text) < 500
    with pytest.raises(RecipeError, match=r"aliases.yaml: invalid YAML.*expands to"):
        load_recipe(path)
    path.write_text("model: &a\n  kwargs: {x: *a}\n")
    with pytest.raises(RecipeError, match="recursive alias"):
        load_recipe(path)
    # Aliases of ordinary size still load.
    path.write_text("data:\n  crop_size: &crop [32, 32]\neval:\n  size: *crop\n")
    assert load_recipe(path).eval.size == (32, 32)


def test_recipe_listing_survives_nested_aliases_within_a_memory_limit(tmp_path):
    # `kseg recipes` reads each description: `str()` of 9 levels of aliases
    # would take gigabytes. A child with 1 GiB of address space (no
    # TensorFlow is loaded to list recipes) must answer at once.
    path = tmp_path / "bomb.yaml"
    path.write_text(f"description:\n{_nested_aliases(9)}\n")
    script = (
        "import resource, sys\n"
        "from kseg.training.recipe_files import recipe_description\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "print(recipe_description(sys.argv[1]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("(unreadable recipe: the document expands")
