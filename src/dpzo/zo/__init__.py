"""Zeroth-order training: where theta lives (the stores, ``dpzo.zo.store``) and the direction stream, the step, the loop and its monitor, snapshots, and the released code's step."""
