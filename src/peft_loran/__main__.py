"""``python -m peft_loran`` runs the command line."""

from peft_loran.cli.main import main

if __name__ == "__main__":
    main()
