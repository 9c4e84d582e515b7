"""Zeroth-order training: flat parameters and the direction stream, the step, the loop, snapshots, and the released code's step."""
