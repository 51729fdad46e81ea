"""``python -m peft_loran_cli`` runs the command line without importing the library first."""

from peft_loran_cli import main

if __name__ == "__main__":
    main()
