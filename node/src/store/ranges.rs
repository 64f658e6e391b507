//! Pure helpers on byte ranges `(offset, len)`: normalise, union, intersect,
//! subtract. Every output is sorted, non-overlapping, coalesced, and has no
//! empty ranges.

/// A byte range: `(offset, len)`.
pub type Range64 = (u64, u64);

/// Sort, drop empty ranges, merge overlapping and adjacent ones.
pub fn normalize(ranges: &[Range64]) -> Vec<Range64> {
    let mut v: Vec<(u64, u64)> =
        ranges.iter().filter(|r| r.1 > 0).map(|&(o, l)| (o, o.saturating_add(l))).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// Union of two range lists.
pub fn union(a: &[Range64], b: &[Range64]) -> Vec<Range64> {
    let mut all = a.to_vec();
    all.extend_from_slice(b);
    normalize(&all)
}

/// Clip every range to `[0, limit)`.
pub fn clip(ranges: &[Range64], limit: u64) -> Vec<Range64> {
    let v: Vec<Range64> =
        ranges.iter().filter(|r| r.0 < limit).map(|&(o, l)| (o, l.min(limit - o))).collect();
    normalize(&v)
}

/// Intersection of two range lists.
pub fn intersect(a: &[Range64], b: &[Range64]) -> Vec<Range64> {
    let (a, b) = (normalize(a), normalize(b));
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let (as_, ae) = (a[i].0, a[i].0 + a[i].1);
        let (bs, be) = (b[j].0, b[j].0 + b[j].1);
        let (s, e) = (as_.max(bs), ae.min(be));
        if s < e {
            out.push((s, e - s));
        }
        if ae < be {
            i += 1;
        } else {
            j += 1;
        }
    }
    normalize(&out)
}

/// `a` minus `b`.
pub fn subtract(a: &[Range64], b: &[Range64]) -> Vec<Range64> {
    let (a, b) = (normalize(a), normalize(b));
    let mut out = Vec::new();
    let mut j = 0;
    for &(o, l) in &a {
        let mut s = o;
        let e = o + l;
        while j < b.len() && b[j].0 + b[j].1 <= s {
            j += 1;
        }
        let mut k = j;
        while s < e && k < b.len() && b[k].0 < e {
            if b[k].0 > s {
                out.push((s, b[k].0 - s));
            }
            s = s.max(b[k].0 + b[k].1);
            k += 1;
        }
        if s < e {
            out.push((s, e - s));
        }
    }
    normalize(&out)
}

/// Sum of lengths.
pub fn total(ranges: &[Range64]) -> u64 {
    ranges.iter().map(|r| r.1).sum()
}

/// Each range cut into pieces of at most `max` bytes, in order.
pub fn chunks(ranges: &[Range64], max: u64) -> impl Iterator<Item = Range64> + '_ {
    assert!(max > 0, "chunk size 0");
    ranges.iter().flat_map(move |&(off, len)| {
        (off..off + len).step_by(max as usize).map(move |pos| (pos, max.min(off + len - pos)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunks_cut_each_range_at_most_max_long() {
        let got: Vec<Range64> = chunks(&[(0, 10), (20, 4)], 4).collect();
        assert_eq!(got, vec![(0, 4), (4, 4), (8, 2), (20, 4)]);
        assert_eq!(chunks(&[], 4).count(), 0);
    }

    fn to_set(r: &[Range64], n: u64) -> Vec<bool> {
        let mut v = vec![false; n as usize];
        for &(o, l) in r {
            for x in o..(o + l).min(n) {
                v[x as usize] = true;
            }
        }
        v
    }

    fn arb() -> impl Strategy<Value = Vec<Range64>> {
        proptest::collection::vec((0u64..200, 0u64..40), 0..12)
    }

    proptest! {
        #[test]
        fn set_operations_match_a_bit_per_byte_model(a in arb(), b in arb()) {
            let n = 256;
            let (sa, sb) = (to_set(&a, n), to_set(&b, n));
            let u = to_set(&union(&a, &b), n);
            let i = to_set(&intersect(&a, &b), n);
            let d = to_set(&subtract(&a, &b), n);
            for x in 0..n as usize {
                prop_assert_eq!(u[x], sa[x] || sb[x]);
                prop_assert_eq!(i[x], sa[x] && sb[x]);
                prop_assert_eq!(d[x], sa[x] && !sb[x]);
            }
            for out in [union(&a, &b), intersect(&a, &b), subtract(&a, &b)] {
                for w in out.windows(2) {
                    prop_assert!(w[0].0 + w[0].1 < w[1].0, "not coalesced: {:?}", out);
                }
                prop_assert!(out.iter().all(|r| r.1 > 0));
            }
        }
    }
}
