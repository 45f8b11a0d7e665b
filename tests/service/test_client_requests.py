"""The request the client and `t2i generate` build from their arguments, image-to-image fields
included, checked on the protobuf message they would send (no service needed)."""

import pytest
from typer.testing import CliRunner

from t2i import cli, client
from t2i.domain import HiresFix

PICTURE = b"\x89PNG\r\n\x1a\n not really, but bytes are bytes"
MASK = b"mask bytes"


def built(prompt: str = "1girl", **options):
    """The GenerateImageRequest the client sends for these arguments."""
    return client._Calls(None, None).generate(prompt, None, None, None, options).request


# --- the client --------------------------------------------------------------------------------

def test_pictures_are_bytes_or_a_path_and_a_picture_defaults_the_size_to_its_own(tmp_path):
    (tmp_path / "in.png").write_bytes(PICTURE)
    (tmp_path / "mask.png").write_bytes(MASK)
    for init_image, mask in ((PICTURE, MASK), (tmp_path / "in.png", str(tmp_path / "mask.png")),
                             (bytearray(PICTURE), memoryview(MASK))):
        request = built(init_image=init_image, mask=mask, denoise=0.6, resize_mode="crop-and-resize")
        assert request.init_image == PICTURE and request.mask == MASK
        assert request.width == 0 and request.height == 0  # the picture's own size
        assert request.HasField("denoise") and request.denoise == 0.6 and request.resize_mode == "crop-and-resize"
    assert (built(init_image=PICTURE, width=512).width, built(init_image=PICTURE, width=512).height) == (512, 0)
    # Without a picture, GenerateRequest's defaults as before.
    plain = built()
    assert (plain.width, plain.height, plain.init_image, plain.HasField("hires_fix")) == (1024, 1024, b"", False)


def test_hires_fix_is_a_hires_fix_or_a_dict_of_its_fields():
    for hires in ({"scale": 1.5, "steps": 12}, HiresFix(scale=1.5, steps=12)):
        request = built(hires_fix=hires)
        assert request.HasField("hires_fix")
        assert (request.hires_fix.scale, request.hires_fix.steps, request.hires_fix.denoise) == (1.5, 12, 0.5)
    with pytest.raises(TypeError, match="scael"):
        built(hires_fix={"scael": 1.5})


def test_a_picture_path_that_cannot_be_read_fails_naming_it(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        built(init_image=str(missing))


# --- t2i generate ----------------------------------------------------------------------------

class Sent(Exception):
    """Raised by the fake client with the request it was asked to send."""


class FakeClient:
    """Stands in for t2i.client.Client: builds the request as the real one does, then stops."""

    def __init__(self, target, *, api_key=None, timeout=None) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def generate(self, prompt, **options):
        raise Sent(built(prompt, **options))


def run(monkeypatch, *arguments: str):
    """`t2i generate ARGUMENTS`: the request it would send, or the CliRunner result if it
    stopped before sending."""
    monkeypatch.setattr(client, "Client", FakeClient)
    result = CliRunner().invoke(cli.app, ["generate", "--prompt", "1girl", *arguments])
    if isinstance(result.exception, Sent):
        return result.exception.args[0]
    return result


def test_init_image_sends_the_files_bytes_at_the_pictures_size(monkeypatch, tmp_path):
    (tmp_path / "in.webp").write_bytes(PICTURE)
    (tmp_path / "mask.png").write_bytes(MASK)
    request = run(monkeypatch, "--init-image", str(tmp_path / "in.webp"), "--mask", str(tmp_path / "mask.png"),
                  "--denoise", "0.55", "--resize-mode", "resize-and-fill")
    assert request.init_image == PICTURE and request.mask == MASK
    assert (request.width, request.height) == (0, 0)
    assert request.denoise == 0.55 and request.resize_mode == "resize-and-fill"
    sized = run(monkeypatch, "--init-image", str(tmp_path / "in.webp"), "--width", "768")
    assert (sized.width, sized.height) == (768, 0)


def test_without_init_image_the_request_is_text_to_image_as_before(monkeypatch):
    request = run(monkeypatch, "--steps", "20")
    assert (request.width, request.height, request.steps) == (1024, 1024, 20)
    assert request.init_image == b"" and request.mask == b"" and request.resize_mode == ""
    assert request.denoise == 1.0 and not request.HasField("hires_fix")


def test_hires_flags_build_the_hires_fix(monkeypatch):
    request = run(monkeypatch, "--hires-scale", "1.5", "--hires-steps", "10", "--hires-denoise", "0.4",
                  "--hires-upscaler", "bicubic")
    assert request.HasField("hires_fix")
    fix = request.hires_fix
    assert (fix.scale, fix.steps, fix.denoise, fix.upscale_method) == (1.5, 10, 0.4, "bicubic")
    defaults = run(monkeypatch, "--hires-scale", "2").hires_fix
    assert (defaults.scale, defaults.steps, defaults.denoise, defaults.upscale_method) == (2.0, 0, 0.5, "")


@pytest.mark.parametrize("arguments, flag, message", [
    (("--init-image", "{tmp}/missing.png"), "--init-image", "cannot read"),
    (("--init-image", "{tmp}"), "--init-image", "cannot read"),
    (("--init-image", "{tmp}/empty.png"), "--init-image", "is empty"),
    (("--mask", "{tmp}/in.png"), "--mask", "a mask needs --init-image"),
    (("--init-image", "{tmp}/in.png", "--mask", "{tmp}/missing.png"), "--mask", "cannot read"),
    (("--hires-steps", "10"), "--hires-scale", "--hires-steps tune the hires fix, which --hires-scale turns on"),
], ids=["missing", "a-folder", "empty", "mask-alone", "missing-mask", "hires-without-scale"])
def test_unusable_arguments_are_usage_errors_naming_the_flag(monkeypatch, tmp_path, arguments, flag, message):
    (tmp_path / "in.png").write_bytes(PICTURE)
    (tmp_path / "empty.png").write_bytes(b"")
    result = run(monkeypatch, *(argument.format(tmp=tmp_path) for argument in arguments))
    assert not isinstance(result, client.pb.GenerateImageRequest), "it was sent"
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())  # the usage box wraps long lines
    assert f"Invalid value for {flag}: " in text and message in text, text
