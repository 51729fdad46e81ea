"""``python -m peft_loran`` runs the command line (:func:`peft_loran_cli.main`)."""

from peft_loran_cli import main

if __name__ == "__main__":
    main()
