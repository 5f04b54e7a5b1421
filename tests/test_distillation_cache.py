"""refimpl.distillation.cache: saved students reload without training, a recipe trains with the trainer
its mode names and the keyword arguments it holds, the digest changes with the recipe and the tokens,
recipes are checked against their trainer's signature, and the book's recipe keeps the most influential
layers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tiny import make_tiny_llama
from refimpl.distillation import cache
from refimpl.distillation import train as kd
from refimpl.distillation.student import StudentSpec, layer_subset_student
from refimpl.training import TrainConfig

VOCAB = 128


def _tokens(shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_cached_student_saves_reloads_without_training_and_rehashes(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path / "cache"))
    _, teacher, tokenizer = tiny_model_folder
    data = _tokens((4, 12), seed=9)
    recipe = cache.StudentRecipe(StudentSpec("tiny", (0, 1)), TrainConfig(steps=3, lr=1e-3), "random tokens 4x12",
                                 mode="online", loss="reverse_kl", options={"temperature": 2.0})
    student, record = cache.cached_student(recipe, teacher, data, name="draft", tokenizer=tokenizer)
    folder = tmp_path / "cache" / "students" / f"draft-{record['digest']}"
    assert record["folder"] == str(folder) and (folder / "config.json").is_file()
    assert cache.student_folder(recipe, data, "draft") == folder
    saved = json.loads((folder / "student.json").read_text())
    assert saved["recipe"]["keep"] == [0, 1] and saved["recipe"]["loss"] == "reverse_kl" and len(saved["losses"]) == 3
    assert saved["recipe"]["refimpl_version"] and saved["recipe"]["train_config"]["lr"] == 1e-3

    def no_training(*args, **kwargs):
        raise AssertionError("a saved student must load, not train")

    with monkeypatch.context() as patched:
        patched.setitem(cache.TRAINERS, "online", no_training)
        loaded, loaded_record = cache.cached_student(recipe, teacher, data, name="draft")
    assert loaded_record == {**saved, "folder": str(folder)} == record and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), student.state_dict().values()))
    from refimpl.models import load_model

    assert load_model(folder)[0].config.num_hidden_layers == 2  # a complete Hugging Face folder

    changed = [cache.StudentRecipe(recipe.spec, TrainConfig(steps=3, lr=2e-3), recipe.data, recipe.mode, recipe.loss,
                                   recipe.options),
               cache.StudentRecipe(StudentSpec("tiny", (1,)), recipe.config, recipe.data, recipe.mode, recipe.loss,
                                   recipe.options),
               cache.StudentRecipe(recipe.spec, recipe.config, recipe.data, "online", "jsd", recipe.options)]
    digests = {cache.student_digest(r, data) for r in changed} | {cache.student_digest(recipe, data)}
    digests.add(cache.student_digest(recipe, _tokens((4, 12), seed=10)))  # other training tokens
    assert len(digests) == 5
    # a missing student is re-created with the same weights
    shutil.rmtree(folder)
    again, _ = cache.cached_student(recipe, teacher, data, name="draft")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), student.state_dict().values()))


@pytest.mark.parametrize("mode, shape, loss, options", [
    ("online", (4, 12), "jsd", {"alpha": 0.5, "batch_size": 2}),
    ("offline", (4, 12), None, {"top_k": 8}),
    ("sequence", (4, 5), None, {"max_new_tokens": 4, "batch_size": 2}),
    ("on_policy", (4, 12), "reverse_kl", {"prompt_len": 6, "student_fraction": 0.5}),
])
def test_a_recipe_trains_with_the_trainer_its_mode_names(tmp_path, monkeypatch, mode, shape, loss, options):
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path))
    teacher, data, config = make_tiny_llama(0, num_hidden_layers=3), _tokens(shape, seed=11), TrainConfig(steps=2)
    recipe = cache.StudentRecipe(StudentSpec("tiny", (0, 2)), config, "random tokens", mode, loss, options)
    student, record = cache.cached_student(recipe, teacher, data, name=mode.replace("_", "-"))
    direct = layer_subset_student(teacher, (0, 2))
    log = recipe.trainer(direct, teacher, data, config, **({} if loss is None else {"loss": loss}), **options)
    assert record["losses"] == log.losses and record["recipe"]["mode"] == mode
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), direct.state_dict().values()))


def test_recipe_validation():
    spec, config = StudentSpec("tiny", (0,)), TrainConfig(steps=1)
    assert cache.StudentRecipe(spec, config, "d").trainer is kd.distill_online
    assert cache.StudentRecipe(spec, config, "d", "sequence", options={"max_new_tokens": 2}).keywords() == \
        {"max_new_tokens": 2}
    assert cache.StudentRecipe(spec, config, "d", loss="jsd", options={"beta": 0.2}).keywords() == \
        {"beta": 0.2, "loss": "jsd"}
    with pytest.raises(ValueError, match="mode must be one of"):
        cache.StudentRecipe(spec, config, "d", mode="white_box")
    with pytest.raises(ValueError, match="options must be a mapping with keys among .* of distill_online"):
        cache.StudentRecipe(spec, config, "d", options={"lr": 1.0})
    with pytest.raises(ValueError, match="options must be a mapping with keys among"):
        cache.StudentRecipe(spec, config, "d", options={"top_k": 4})  # offline's, not online's
    with pytest.raises(ValueError, match="options must be a mapping with keys among"):
        cache.StudentRecipe(spec, config, "d", options={"loss": "jsd"})  # the recipe's own field
    with pytest.raises(ValueError, match=r"options must set \['prompt_len'\], which distill_on_policy needs"):
        cache.StudentRecipe(spec, config, "d", mode="on_policy")
    with pytest.raises(ValueError, match="loss must be None for mode 'sequence'"):
        cache.StudentRecipe(spec, config, "d", "sequence", "forward_kl", {"max_new_tokens": 2})
    with pytest.raises(ValueError, match="loss must be one of"):
        cache.StudentRecipe(spec, config, "d", loss="kl")
    with pytest.raises(ValueError, match="options must hold JSON values"):
        cache.StudentRecipe(spec, config, "d", options={"alpha": torch.tensor(0.5)})
    with pytest.raises(ValueError, match="data must be a non-empty description"):
        cache.StudentRecipe(spec, config, "")
    with pytest.raises(TypeError, match="spec must be a StudentSpec"):
        cache.StudentRecipe((0,), config, "d")
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        cache.StudentRecipe(spec, {"steps": 1}, "d")


def test_bad_names_and_recipes():
    teacher, recipe = make_tiny_llama(0), cache.StudentRecipe(StudentSpec("t", (0,)), TrainConfig(steps=1), "d")
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        cache.cached_student(recipe, teacher, _tokens((2, 8)), "a/b")
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        cache.student_folder(recipe, _tokens((2, 8)), "")
    with pytest.raises(TypeError, match="recipe must be a StudentRecipe"):
        cache.student_digest({"mode": "online"}, _tokens((2, 8)))
    with pytest.raises(TypeError, match="teacher must be a Hugging Face causal LM"):
        cache.cached_student(recipe, torch.nn.Linear(2, 2), _tokens((2, 8)))


@pytest.mark.slow
def test_influence_student_recipe_keeps_the_most_influential_layers(smollm2):
    from refimpl import data as corpora
    from refimpl.pruning import structured

    model, tokenizer = smollm2
    recipe, blocks = cache.influence_student_recipe(model, tokenizer, "smollm2-135m", n_layers=12)
    scored = torch.cat([corpora.token_blocks(tokenizer, corpora.load_text(name, "calibration"), seq_len=256, n_blocks=1)
                        for name in corpora.CORPORA])
    influence = structured.activation_importance(model, scored).layers
    assert recipe.spec.keep == tuple(sorted(influence.topk(12).indices.tolist()))
    assert recipe.spec.teacher == "smollm2-135m" and recipe.mode == "online" and recipe.loss == "forward_kl"
    assert blocks.shape == (16, 128) and blocks.dtype == torch.long
    again, blocks_again = cache.influence_student_recipe(model, tokenizer, "smollm2-135m", n_layers=12)
    assert cache.student_digest(again, blocks_again) == cache.student_digest(recipe, blocks)  # deterministic
    with pytest.raises(ValueError, match="n_layers must be at most"):
        cache.influence_student_recipe(model, tokenizer, "smollm2-135m", n_layers=31)
    with pytest.raises(ValueError, match="n_layers"):
        cache.influence_student_recipe(model, tokenizer, "smollm2-135m", n_layers=0)
