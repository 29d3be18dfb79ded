"""Training procedures that belong to one method (LoRA-drop's two stages), kept out of ``methods/`` because a
layer strategy must not import the trainer.
"""
