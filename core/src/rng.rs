//! A small seeded PRNG, so that jitter is reproducible from the config's seed.

/// SplitMix64: tiny, fast, and good enough for backoff jitter; never seeded from the OS.
#[derive(Clone, Debug)]
pub struct Prng {
    state: u64,
}

impl Prng {
    /// A generator whose whole sequence is fixed by `seed`.
    pub const fn from_seed(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform value in `low..=high` (requires `low <= high`; swapped otherwise).
    pub fn range_inclusive(&mut self, low: u64, high: u64) -> u64 {
        let (low, high) = if low <= high { (low, high) } else { (high, low) };
        let span = high - low;
        if span == u64::MAX {
            return self.next_u64();
        }
        // Modulo bias is at most span/2^64: irrelevant for jitter in per-mille steps.
        low + self.next_u64() % (span + 1)
    }

    /// `value × U(low_permille, high_permille) / 1000`, saturating: jitter without floats.
    pub fn jitter(&mut self, value: u64, low_permille: u64, high_permille: u64) -> u64 {
        let factor = self.range_inclusive(low_permille, high_permille);
        let scaled = (u128::from(value) * u128::from(factor)) / 1000;
        u64::try_from(scaled).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_jitter_in_bounds() {
        let mut a = Prng::from_seed(7);
        let mut b = Prng::from_seed(7);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let j = a.jitter(1000, 800, 1400);
            assert!((800..=1400).contains(&j), "{j}");
            b.jitter(1000, 800, 1400);
        }
        assert_ne!(Prng::from_seed(1).next_u64(), Prng::from_seed(2).next_u64());
    }
}
