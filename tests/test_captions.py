import random
from collections import Counter

import pytest
import torch

from trainer.io import MemtrainError
from trainer.mitigate.captions import (
    RANDOM_NUMBER_HIGH,
    CaptionAugConfig,
    add_embedding_noise,
    augment_caption,
    token_pool,
)
from trainer.toy.base import build_tokenizer

CAPTION = "a large red circle and a small blue ring"
WORDS = CAPTION.split()
EXTRA = ["zebra", "violin", "tundra", "quartz", "meadow"]


@pytest.fixture(scope="module")
def pool():
    return token_pool(build_tokenizer(WORDS + EXTRA))


def is_subsequence(small, big):
    it = iter(big)
    return all(w in it for w in small)


def inserted(result: str, original: list[str]) -> list[str]:
    """The words of `result` that are not the original ones (original must be a subsequence)."""
    words = result.split()
    assert is_subsequence(original, words), (result, original)
    return list((Counter(words) - Counter(original)).elements())


def test_token_pool_is_whole_words_of_the_vocabulary(pool):
    assert sorted(pool) == sorted(set(WORDS + EXTRA) - {"a"})  # single letters excluded
    assert all(w.isalpha() and w.isascii() for w in pool)
    assert not any("<" in w or "|" in w for w in pool)


def test_all_off_is_identity_and_leaves_rng_untouched(pool):
    rng = random.Random(0)
    state = rng.getstate()
    odd = "  A  caption, with   spacing "
    for caption in (CAPTION, odd):
        assert augment_caption([caption, "other"], CaptionAugConfig(), rng, pool) == caption
    assert rng.getstate() == state


@pytest.mark.parametrize("field", ["random_caption_p", "random_token_p", "word_repeat_p", "random_number_p"])
def test_p_zero_is_identity_for_every_seed(field, pool):
    cfg = CaptionAugConfig(**{field: 0.0})
    for seed in range(50):
        assert augment_caption([CAPTION], cfg, random.Random(seed), pool) == CAPTION


def test_rc_gives_four_pool_tokens_and_short_circuits(pool):
    cfg = CaptionAugConfig(random_caption_p=1.0, random_token_p=1.0, word_repeat_p=1.0, random_number_p=1.0)
    for seed in range(50):
        out = augment_caption([CAPTION], cfg, random.Random(seed), pool).split()
        assert len(out) == 4 and all(w in pool for w in out)


def test_rt_adds_exactly_two_pool_tokens_at_word_positions(pool):
    cfg = CaptionAugConfig(random_token_p=1.0)
    positions = set()
    for seed in range(100):
        out = augment_caption([CAPTION], cfg, random.Random(seed), pool)
        words = out.split()
        assert len(words) == len(WORDS) + 2
        new = inserted(out, WORDS)
        assert len(new) == 2 and all(w in pool for w in new)
        positions.update(i for i, w in enumerate(words) if w in EXTRA)
    assert 0 in positions and len(WORDS) + 1 in positions  # both ends are possible gaps


def test_cwr_adds_two_words_from_the_caption(pool):
    cfg = CaptionAugConfig(word_repeat_p=1.0)
    for seed in range(100):
        out = augment_caption([CAPTION], cfg, random.Random(seed), pool)
        new = inserted(out, WORDS)
        assert len(out.split()) == len(WORDS) + 2
        assert len(new) == 2 and all(w in WORDS for w in new)


def test_rna_adds_a_number_in_range(pool):
    cfg = CaptionAugConfig(random_number_p=1.0)
    seen = set()
    for seed in range(100):
        out = augment_caption([CAPTION], cfg, random.Random(seed), pool)
        new = inserted(out, WORDS)
        assert len(new) == 1 and new[0].isdigit() and 0 <= int(new[0]) < RANDOM_NUMBER_HIGH
        seen.add(new[0])
    assert len(seen) > 90
    out = augment_caption(
        [CAPTION], CaptionAugConfig(random_number_p=1.0, random_number_count=3), random.Random(0), pool
    )
    assert len(inserted(out, WORDS)) == 3


def test_probability_is_respected(pool):
    cfg = CaptionAugConfig(random_token_p=0.1)
    rng = random.Random(123)
    changed = sum(augment_caption([CAPTION], cfg, rng, pool) != CAPTION for _ in range(4000))
    assert 0.08 < changed / 4000 < 0.12


def test_all_methods_stack_in_order():
    cfg = CaptionAugConfig(random_token_p=1.0, word_repeat_p=1.0, random_number_p=1.0)
    for seed in range(50):
        out = augment_caption([CAPTION], cfg, random.Random(seed), EXTRA)  # a pool disjoint from the caption
        new = inserted(out, WORDS)
        assert len(new) == 5
        assert sum(w.isdigit() for w in new) == 1
        assert sum(w in EXTRA for w in new) == 2
        # the repeated words come from the caption, never from the inserted random tokens
        assert sum(w in WORDS for w in new) == 2


def test_multiple_captions_draws_uniformly(pool):
    caps = ["first caption", "second caption", "third caption"]
    rng = random.Random(0)
    counts = Counter(
        augment_caption(caps, CaptionAugConfig(multiple_captions=True), rng, pool) for _ in range(3000)
    )
    assert set(counts) == set(caps) and min(counts.values()) > 900
    assert augment_caption(caps, CaptionAugConfig(), random.Random(0), pool) == "first caption"
    assert augment_caption(
        "just a string", CaptionAugConfig(multiple_captions=True), random.Random(0), pool
    ) == ("just a string")


def test_reproducible_from_the_seed(pool):
    cfg = CaptionAugConfig(
        multiple_captions=True,
        random_caption_p=0.1,
        random_token_p=0.5,
        word_repeat_p=0.5,
        random_number_p=0.5,
    )
    caps = [CAPTION, "a small green square"]
    a = [augment_caption(caps, cfg, random.Random(f"s/{i}"), pool) for i in range(200)]
    b = [augment_caption(caps, cfg, random.Random(f"s/{i}"), pool) for i in range(200)]
    assert a == b
    assert len(set(a)) > 50
    # a fixed seed gives a fixed caption (guards against hidden global randomness)
    assert augment_caption([CAPTION], CaptionAugConfig(random_token_p=1.0), random.Random(7), pool) == (
        augment_caption([CAPTION], CaptionAugConfig(random_token_p=1.0), random.Random(7), pool)
    )


def test_works_with_recipe_section_without_counts(pool):
    class Section:  # the recipe's CaptionSection has the probabilities but no counts
        multiple_captions = False
        random_caption_p = 0.0
        random_token_p = 1.0
        word_repeat_p = 0.0
        random_number_p = 0.0
        embedding_noise = 0.0

    out = augment_caption([CAPTION], Section(), random.Random(0), pool)
    assert len(inserted(out, WORDS)) == 2
    assert CaptionAugConfig.from_obj(Section()).random_token_p == 1.0


def test_empty_pool_is_a_clear_error():
    with pytest.raises(MemtrainError, match="random_token_p"):
        augment_caption([CAPTION], CaptionAugConfig(random_token_p=1.0), random.Random(0), [])


def test_gni_statistics():
    c = torch.zeros(64, 77, 32)
    g = torch.Generator().manual_seed(0)
    out = add_embedding_noise(c, 0.5, g)
    noise = out - c
    assert abs(noise.mean().item()) < 0.01
    assert abs(noise.std().item() - 0.5) < 0.01
    again = add_embedding_noise(c, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert add_embedding_noise(c, 0.0, g) is c
    half = add_embedding_noise(c.half(), 1.0, g)
    assert half.dtype == torch.float16 and half.shape == c.shape
    with pytest.raises(MemtrainError, match="embedding_noise"):
        add_embedding_noise(c, 1.5, g)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(random_caption_p=1.5), "data.captions.random_caption_p"),
        (dict(random_token_p=-0.1), "data.captions.random_token_p"),
        (dict(word_repeat_p=2), "data.captions.word_repeat_p"),
        (dict(random_number_p=1.01), "data.captions.random_number_p"),
        (dict(embedding_noise=1.2), "data.captions.embedding_noise"),
        (dict(random_token_count=0), "data.captions.random_token_count"),
        (dict(word_repeat_count=0), "data.captions.word_repeat_count"),
        (dict(random_caption_tokens=-1), "data.captions.random_caption_tokens"),
        (dict(random_number_count=0), "data.captions.random_number_count"),
        (dict(multiple_captions="yes"), "data.captions.multiple_captions"),
    ],
)
def test_validate_names_the_key(kwargs, key):
    with pytest.raises(MemtrainError, match=key.replace(".", r"\.")):
        CaptionAugConfig(**kwargs).validate()


def test_validate_accepts_defaults_and_paper_values():
    CaptionAugConfig().validate()
    CaptionAugConfig(
        multiple_captions=True,
        random_caption_p=0.1,
        random_token_p=0.1,
        word_repeat_p=0.1,
        random_number_p=0.1,
        embedding_noise=0.1,
    ).validate()
    assert not CaptionAugConfig().enabled and CaptionAugConfig(word_repeat_p=0.1).enabled
