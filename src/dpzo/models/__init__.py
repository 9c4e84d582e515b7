"""Models: loading a checkpoint as a prompt classifier, scoring candidates, evaluation."""
