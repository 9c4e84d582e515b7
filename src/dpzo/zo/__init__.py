"""Zeroth-order training: flat parameters and the direction stream, the step, the loop and its monitor, snapshots, and the released code's step."""
