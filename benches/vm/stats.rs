//! Medians and spreads of repeated measurements.

use serde::Serialize;

/// A sample set summarised: median, quartiles and extremes.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub q1: f64,
    pub q3: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// `None` for an empty set (every run of a variant failed).
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        Some(Summary {
            n: s.len(),
            median: quantile(&s, 0.5),
            q1: quantile(&s, 0.25),
            q3: quantile(&s, 0.75),
            min: s[0],
            max: s[s.len() - 1],
        })
    }

    /// "median [min-max]" with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        if self.n == 1 {
            return format!("{:.digits$}", self.median);
        }
        format!(
            "{:.digits$} [{:.digits$}-{:.digits$}]",
            self.median, self.min, self.max
        )
    }
}

/// Linear interpolation between closest ranks of a sorted, non-empty slice.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Element-wise `a[i] / b[i]` of paired (interleaved) runs: pairing cancels slow drift in
/// the machine's load, which the ratio of two medians would not.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter(|(_, y)| **y > 0.0)
        .map(|(x, y)| x / y)
        .collect()
}

/// A distribution-free 95% confidence interval of the median of `samples`: the order
/// statistics `[x_(k), x_(n+1-k)]` with the largest `k` whose coverage, from the binomial
/// distribution of how many samples fall below the true median, is still at least 95%.
/// `None` below 6 samples, where even `[min, max]` covers less than 95%.
pub fn median_ci95(samples: &[f64]) -> Option<(f64, f64)> {
    let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    // P(B <= j) for B ~ Binomial(n, 1/2), accumulated term by term.
    let mut pmf = 0.5f64.powi(i32::try_from(n).ok()?);
    let mut below = 0.0;
    let mut k = 0;
    for j in 0..n / 2 {
        below += pmf;
        if 2.0 * below > 0.05 {
            break;
        }
        k = j + 1;
        pmf = pmf * (n - j) as f64 / (j + 1) as f64;
    }
    (k >= 1).then(|| (s[k - 1], s[n - k]))
}
