//! A fixed-bucket histogram as a plain value.
//!
//! Bucket bounds are `'static` slices chosen where the histogram is declared (in the unit the
//! recorder measures in: µs, bytes, records), so recording is a short linear scan and an add:
//! no allocation, no atomics. The value is `Copy`, so it can live inside a counters struct
//! that is copied out whole for a snapshot. Rendering to Prometheus' cumulative `_bucket`
//! series (and converting units, e.g. µs to seconds) is in `exposition.rs`.

/// Most buckets a histogram can have (the `+Inf` bucket not counted).
pub const MAX_BUCKETS: usize = 24;

/// Counts of observations per bucket, their sum and their count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Histogram {
    /// Upper bounds (inclusive, Prometheus' `le`), ascending, at most [`MAX_BUCKETS`].
    bounds: &'static [u64],
    /// `counts[i]`: observations `<= bounds[i]` and `> bounds[i - 1]`; the last used slot
    /// (`counts[bounds.len()]`) holds those above every bound.
    counts: [u64; MAX_BUCKETS + 1],
    sum: u64,
    count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending; more than [`MAX_BUCKETS`] is a bug of the
    /// declaring code, caught by the tests that render every histogram).
    pub const fn new(bounds: &'static [u64]) -> Histogram {
        assert!(bounds.len() <= MAX_BUCKETS, "too many histogram buckets");
        Histogram {
            bounds,
            counts: [0; MAX_BUCKETS + 1],
            sum: 0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn record(&mut self, value: u64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum = self.sum.saturating_add(value);
        self.count += 1;
    }

    pub fn bounds(&self) -> &'static [u64] {
        self.bounds
    }

    /// Cumulative counts, one per bound (observations `<= bound`), as Prometheus wants them.
    pub fn cumulative(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut acc = 0;
        self.bounds.iter().enumerate().map(move |(i, b)| {
            acc += self.counts[i];
            (*b, acc)
        })
    }

    pub fn sum(&self) -> u64 {
        self.sum
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[u64] = &[10, 100, 1000];

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let mut h = Histogram::new(BOUNDS);
        for v in [0, 10, 11, 100, 5000] {
            h.record(v);
        }
        let c: Vec<(u64, u64)> = h.cumulative().collect();
        assert_eq!(c, vec![(10, 2), (100, 4), (1000, 4)]);
        assert_eq!(
            h.count(),
            5,
            "the one above every bound counts only in +Inf"
        );
        assert_eq!(h.sum(), 5121);
    }
}
