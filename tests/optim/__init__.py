"""Tests of chatlm.optim: MuonAdamW, parameter routing, schedules and depth transfer."""
