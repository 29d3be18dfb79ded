"""``python -m lorakit``: the ``lorakit`` command (the same entry point as the console script).

Example (a shell)::

    python -m lorakit train --model minilm --data movie_reviews --steps 200
"""
from lorakit.cli import main

if __name__ == "__main__":
    main()
