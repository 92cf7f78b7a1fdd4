"""`python -m dreamlora` runs the command line."""

from dreamlora.cli import app

if __name__ == "__main__":
    app()
