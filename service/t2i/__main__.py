from .cli import app

app(prog_name="t2i")
