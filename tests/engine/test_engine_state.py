"""The engine's state: it ends with its forward, stays on its own cache, is never shared or copied, and
leaves nothing behind; every strategy picks the same tokens in every dtype, with and without a cache."""

import copy
import gc
import pickle
import threading
import weakref

import pytest
import torch
from conftest import STRATEGIES, refuses

import vtprune
from vtprune.strategies.base import DECODER_PLACE, INPUT_PLACE
from vtprune.strategies.registry import strategy_class
from vtprune.testing import MODEL_KINDS, build_model
from vtprune.vocabulary.compat import CACHE_KWARG, output_cache


def stage_arguments(name: str, stage: str) -> dict:
    """``prune`` keywords that run strategy ``name`` at ``stage`` (decoder: layer 2) and really prune."""
    cls = strategy_class(name)
    arguments = {"keep_ratio": 0.5} if cls.needs_budget else {}
    if stage == DECODER_PLACE:
        arguments["layer"] = 2
    return arguments


def every_strategy_and_stage() -> list[tuple[str, str]]:
    return [(name, stage) for name in STRATEGIES for stage in sorted(strategy_class(name).places)]


# --- (a) nothing left behind ------------------------------------------------------------------------------


def _freeze(value):
    """A comparable snapshot of one attribute: containers by their items' identities, plain values by value."""
    if isinstance(value, dict):
        return tuple((key, id(item)) for key, item in value.items())
    if isinstance(value, (set, frozenset)):
        return frozenset(value)
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    return id(value)


def module_state(model) -> dict:
    """Every submodule's complete instance state: its hook dicts (forward / pre / with_kwargs / always-called,
    backward, state-dict and load hooks), parameters, buffers, children and every other attribute."""
    return {
        name: {key: _freeze(value) for key, value in vars(module).items()} for name, module in model.named_modules()
    }


def run_forward_and_generate(model, inputs: dict) -> None:
    with torch.no_grad():
        model(**inputs)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)


def changed(before: dict, after: dict) -> set[tuple[str, str]]:
    """(module, attribute) pairs that differ, appeared or disappeared."""
    return {
        (name, key)
        for name in before.keys() | after.keys()
        for key in before.get(name, {}).keys() | after.get(name, {}).keys()
        if before.get(name, {}).get(key, "missing") != after.get(name, {}).get(key, "missing")
    }


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_remove_restores_every_submodules_state(models, make_inputs, kind):
    model = models(kind)
    inputs = make_inputs(model, kind, 1)
    run_forward_and_generate(model, inputs)  # the model's own lazily made state exists from here on
    before = module_state(model)
    run_forward_and_generate(model, inputs)
    # What the model itself rewrites at every prefill (Qwen's rope_deltas: from the positions of the sequence it
    # last saw, which a pruned call shortens), whether or not this call changed it.
    own = {("model", "rope_deltas")} & {(name, key) for name, attributes in before.items() for key in attributes}
    assert changed(before, module_state(model)) <= own
    probes = every_strategy_and_stage()
    assert {stage for _, stage in probes} == {INPUT_PLACE, DECODER_PLACE}
    for name, stage in probes:
        arguments = stage_arguments(name, stage)
        if not refuses(model, name, **arguments):  # a refusal must leave nothing behind either
            handle = vtprune.prune(model, name, **arguments)
            run_forward_and_generate(model, inputs)
            handle.remove()
        assert changed(before, module_state(model)) - own == set(), f"{name} at the {stage} stage left state behind"


# --- (b) the same picks in every dtype, with and without a cache ---------------------------------------------


@pytest.fixture(scope="module")
def dtype_models():
    """The same LLaVA in float32, bfloat16 and float16 (copies made before any wrapping)."""
    base = build_model("llava")
    return {dtype: copy.deepcopy(base).to(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}


def kept_per_prefill(model, inputs: dict, schedule_name: str, stage: str, use_cache: bool) -> list[list]:
    """The kept indices of every image after every stage, for each prefill of one generate() call."""
    records = []
    with torch.no_grad(), vtprune.pruned(model, schedule_name, **stage_arguments(schedule_name, stage)) as handle:
        hook = model.register_forward_hook(lambda *args: records.append(handle.last_record))
        try:
            model.generate(**inputs, max_new_tokens=2, do_sample=False, use_cache=use_cache)
        finally:
            hook.remove()
    prefills = [records[0]] if use_cache else records  # with a cache only the first forward selects
    assert len(prefills) == (1 if use_cache else 2)
    return [[image.kept_by_stage for image in record.images] for record in prefills]


def stage_key(stage: str) -> str:
    return "input" if stage == INPUT_PLACE else "layer 2"


def as_lists(kept: list) -> list:
    return [[{stage: indices.tolist() for stage, indices in image.items()} for image in record] for record in kept]


#: Picks per image that may differ from float32's in bfloat16 / float16 (README, Limits): the model's own
#: features differ by the dtype's rounding there, and ZOO's finite differences (step 0.01) amplify it into
#: swaps of near-tied tokens. Every other strategy must pick exactly float32's tokens on these inputs.
HALF_PRECISION_SWAPS = {"zoo": 1}


def differing_picks(got: list, expected: list) -> int:
    """The most picks any image of any stage has that the other side does not."""
    return max(
        len(set(image[stage]) - set(reference[stage]))
        for image, reference in zip(got, expected, strict=True)
        for stage in reference
    )


@pytest.mark.parametrize(("name", "stage"), every_strategy_and_stage())
def test_every_strategy_picks_the_same_tokens_in_every_dtype_with_and_without_cache(
    dtype_models, make_inputs, name, stage
):
    expected = None
    for dtype, model in dtype_models.items():
        inputs = make_inputs(model, "llava", 3)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        cached = as_lists(kept_per_prefill(model, inputs, name, stage, use_cache=True))[0]
        for step, uncached in enumerate(as_lists(kept_per_prefill(model, inputs, name, stage, use_cache=False))):
            assert uncached == cached, f"{dtype}: prefill {step} of a cache-less generate() picked other tokens"
        if expected is None:  # float32 with the cache
            expected = cached
            if strategy_class(name).needs_budget:
                assert all(len(image[stage_key(stage)]) < 16 for image in expected), "the stage must prune"
        elif name in HALF_PRECISION_SWAPS:
            assert [image.keys() for image in cached] == [image.keys() for image in expected]
            assert differing_picks(cached, expected) <= HALF_PRECISION_SWAPS[name], dtype
        else:
            assert cached == expected, dtype


# --- the forward's state ends with it (issue 11, item 11) ----------------------------------------------------


@pytest.mark.parametrize("kind", ["llava", "qwen3_vl"])
def test_inner_modules_run_unpruned_after_a_generate_with_a_decoder_stage(models, make_inputs, kind):
    model = models(kind)
    inputs = make_inputs(model, kind, 3)
    with torch.no_grad():
        inner = model.model(**inputs).last_hidden_state
        with vtprune.pruned(model, "divprune:50%+fastv@2:50%") as handle:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert handle.session.state is None
            assert torch.equal(model.model(**inputs).last_hidden_state, inner)


# --- a pruned cache is continued by its own handle only (item 3) ---------------------------------------------


def pruned_prefill(model, inputs: dict):
    """The cache of one pruned forward and the inputs of the decode step that continues it."""
    out = model(**inputs, use_cache=True)
    mask = inputs["attention_mask"]
    step = {"input_ids": out.logits[:, -1:].argmax(-1), "attention_mask": torch.cat([mask, mask[:, :1] * 0 + 1], 1)}
    return output_cache(out), step


@pytest.mark.parametrize("schedule", ["divprune:50%", "fastv@2:50%"])
def test_a_pruned_cache_is_freed_when_dropped_without_a_garbage_collection(models, make_inputs, schedule):
    """The KV cache of a pruned prefill goes when its last user drops it, as an unpruned one does, not at the next
    run of the cycle collector (its guard used to hold it in a reference cycle)."""
    model = models("llava")
    inputs = make_inputs(model, "llava", 2)
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.no_grad(), vtprune.pruned(model, schedule):
            cache, _ = pruned_prefill(model, inputs)
            assert cache.get_seq_length() > 0
            dropped = weakref.ref(cache)
            del cache
            assert dropped() is None
    finally:
        if collecting:
            gc.enable()


@pytest.mark.parametrize("schedule", ["divprune:50%", "fastv@2:50%"])
def test_a_pruned_cache_is_refused_after_remove_and_under_another_handle(models, make_inputs, schedule):
    model = models("llava")
    inputs = make_inputs(model, "llava", 3)
    with torch.no_grad():
        with vtprune.pruned(model, schedule):
            cache, step = pruned_prefill(model, inputs)
            continued = model(**step, **{CACHE_KWARG: cache}).logits  # its own handle continues it
            assert continued.shape[:2] == (3, 1)
            cache, step = pruned_prefill(model, inputs)
        with pytest.raises(vtprune.UnsupportedCacheError, match="after handle.remove"):
            model(**step, **{CACHE_KWARG: cache})
        with vtprune.pruned(model, schedule), pytest.raises(vtprune.UnsupportedCacheError, match="another handle"):
            model(**step, **{CACHE_KWARG: cache})


def test_a_pruned_cache_is_refused_by_an_inner_module(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 3)
    with torch.no_grad(), vtprune.pruned(model, "divprune:50%"):
        cache, step = pruned_prefill(model, inputs)
        with pytest.raises(vtprune.UnsupportedCacheError, match="inner module"):
            model.model.language_model(input_ids=step["input_ids"], **{CACHE_KWARG: cache})


# --- copies are refused (item 4) -----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["divprune:50%", "fastv@2:50%", "mmtok:50%"])
def test_a_wrapped_model_refuses_deepcopy_and_pickle_and_stays_wrapped(models, make_inputs, schedule):
    model = models("llava")
    inputs = make_inputs(model, "llava", 1)
    with torch.no_grad(), vtprune.pruned(model, schedule) as handle:
        expected = model(**inputs).logits
        with pytest.raises(vtprune.WrappedCopyError, match="cannot be copied"):
            copy.deepcopy(model)
        with pytest.raises(vtprune.WrappedCopyError, match="cannot be pickled"):
            pickle.dumps(model)
        cache, _ = pruned_prefill(model, inputs)
        with pytest.raises(vtprune.WrappedCopyError):
            copy.deepcopy(cache)
        assert handle.is_active and torch.equal(model(**inputs).logits, expected)
        with pytest.raises(vtprune.AlreadyPrunedError):
            vtprune.prune(model, schedule)
    clone = copy.deepcopy(model)  # once removed, a plain model again (transformers' own hooks refuse pickle)
    assert not hasattr(clone, "_vtprune_handle")


# --- one forward at a time (item 7) --------------------------------------------------------------------------


def test_a_second_thread_is_refused_while_a_forward_runs(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 3)
    inside, release = threading.Event(), threading.Event()
    results = {}

    def wait_inside(module, args, kwargs):
        if threading.current_thread().name == "first":
            inside.set()
            assert release.wait(60)

    with torch.no_grad(), vtprune.pruned(model, "fastv@2:50%"):
        expected = model(**inputs).logits
        hook = model.model.language_model.layers[3].register_forward_pre_hook(wait_inside, with_kwargs=True)

        def first():
            with torch.no_grad():
                results["first"] = model(**inputs).logits

        thread = threading.Thread(target=first, name="first")
        thread.start()
        try:
            assert inside.wait(60)
            with pytest.raises(vtprune.ConcurrentCallError, match="another thread"):
                model(**inputs)
        finally:
            release.set()
            thread.join()
            hook.remove()
        assert torch.equal(results["first"], expected)
        assert torch.equal(model(**inputs).logits, expected)  # and the model is free again


# --- only the prefill's own encoding is recorded (item 10) ---------------------------------------------------


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_projector_calls_outside_a_prefill_are_not_recorded(models, make_inputs, kind):
    model = models(kind)
    inputs = make_inputs(model, kind, 1)
    pixels = {key: inputs[key] for key in ("pixel_values", "image_grid_thw", "image_sizes") if key in inputs}
    with torch.no_grad(), vtprune.pruned(model, "mmtok:50%") as handle:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        after_generate = list(handle.capture.projector_inputs._calls)
        assert len(after_generate) == 1  # the one encoding that prefill read
        for _ in range(5):
            model.model.get_image_features(**pixels)
        assert [id(call) for call in handle.capture.projector_inputs._calls] == [id(call) for call in after_generate]


# --- training inputs a decoder stage cannot honour are refused up front (item 13) ----------------------------


def test_labels_with_a_decoder_stage_are_refused_and_packed_by_an_input_stage(models, make_inputs):
    model = models("llava")
    inputs = make_inputs(model, "llava", 3)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        with vtprune.pruned(model, "fastv@2:50%"), pytest.raises(vtprune.UnsupportedTrainingError, match="labels"):
            model(**inputs, labels=labels)
        with vtprune.pruned(model, "divprune:50%"):
            assert torch.isfinite(model(**inputs, labels=labels).loss)


def test_gradient_checkpointing_with_a_decoder_stage_is_refused(make_inputs):
    model = build_model("llava")
    model.activation_checkpointing_enable()
    model.train()
    inputs = make_inputs(model, "llava", 1)
    refused = pytest.raises(vtprune.UnsupportedTrainingError, match="gradient checkpointing")
    with vtprune.pruned(model, "fastv@2:50%"), refused:
        model(**inputs)
    with vtprune.pruned(model, "divprune:50%"):  # an input stage trains as usual
        model(**inputs).logits.float().pow(2).mean().backward()


@pytest.mark.parametrize("schedule", ["mmtok:50%", "zoo:50%(directions:2)"])
def test_precomputed_encoder_outputs_are_refused_by_strategies_that_read_projector_inputs(
    models, make_inputs, schedule
):
    model = models("llava")
    inputs = make_inputs(model, "llava", 1)
    with torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=inputs.pop("pixel_values"), return_dict=True)
        with vtprune.pruned(model, schedule), pytest.raises(vtprune.VTPruneError, match="Pass the pixel inputs"):
            model(**inputs, mm_encoder_outputs={"image": encoded})
