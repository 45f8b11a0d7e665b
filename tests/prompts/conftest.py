import pytest


@pytest.fixture(scope="session")
def clip_tokenizers():
    """SDXL's two tokenizers on the real CLIP vocabulary, without building a model."""
    from transformers import CLIPTokenizer

    from t2i.models.demo import clip_vocabulary

    vocab, merges = clip_vocabulary()
    return (
        CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!"),
    )
