"""Run and measure models: target profiles, sessions per runtime, timing and memory, roofline limits."""
