//! Reference scanning: which of a request's `refscan_needles` occur in an output's file
//! contents and symlink targets (never in names). The harvest feeds every byte it receives
//! through a [`Scanner`] as it stores it, so an output is read once, from the guest, and
//! never again from the castore.

use aho_corasick::AhoCorasick;

#[derive(Debug, thiserror::Error)]
#[error("building the refscan needle matcher")]
pub struct RefscanError(#[source] aho_corasick::BuildError);

/// Finds a request's needles; built once per request.
#[derive(Clone, Debug)]
pub struct Scanner {
    /// `None` when there are no needles: nothing is scanned.
    matcher: Option<AhoCorasick>,
    /// Bytes kept from one piece of a file to the next, so a needle split across pieces is
    /// found: one less than the longest needle.
    overlap: usize,
    count: usize,
}

impl Scanner {
    pub fn new(needles: &[String]) -> Result<Self, RefscanError> {
        if needles.is_empty() {
            return Ok(Self::none());
        }
        let matcher = AhoCorasick::new(needles).map_err(RefscanError)?;
        let overlap = needles
            .iter()
            .map(|n| n.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        Ok(Self {
            matcher: Some(matcher),
            overlap,
            count: needles.len(),
        })
    }

    /// A scanner without needles: finds nothing, costs nothing.
    pub fn none() -> Self {
        Self {
            matcher: None,
            overlap: 0,
            count: 0,
        }
    }

    /// A fresh record of what one output holds.
    pub fn found(&self) -> Found {
        Found(vec![false; self.count])
    }

    /// Marks the needles in one whole haystack (a symlink target).
    pub fn scan(&self, haystack: &[u8], found: &mut Found) {
        if let Some(m) = &self.matcher {
            for hit in m.find_overlapping_iter(haystack) {
                found.0[hit.pattern().as_usize()] = true;
            }
        }
    }

    /// A scan of one file that arrives in pieces.
    pub fn stream(&self) -> Stream<'_> {
        Stream {
            scanner: self,
            tail: Vec::new(),
        }
    }
}

/// Which needles one output holds so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found(Vec<bool>);

impl Found {
    /// The indices of the needles found, ascending.
    pub fn indices(&self) -> Vec<u64> {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, f)| **f)
            .map(|(i, _)| i as u64)
            .collect()
    }
}

/// One file's bytes, fed piece by piece: a needle that straddles two pieces is found, one
/// that straddles two files is not.
pub struct Stream<'s> {
    scanner: &'s Scanner,
    /// The last `overlap` bytes fed so far.
    tail: Vec<u8>,
}

impl Stream<'_> {
    pub fn feed(&mut self, piece: &[u8], found: &mut Found) {
        let overlap = self.scanner.overlap;
        if self.scanner.matcher.is_none() || piece.is_empty() {
            return;
        }
        self.scanner.scan(piece, found);
        if overlap == 0 {
            return;
        }
        // A needle across the boundary starts within the last `overlap` bytes before it and
        // ends within the first `overlap` bytes after it: scan just that window.
        if !self.tail.is_empty() {
            let mut window = self.tail.clone();
            window.extend_from_slice(&piece[..piece.len().min(overlap)]);
            self.scanner.scan(&window, found);
        }
        if piece.len() >= overlap {
            self.tail.clear();
            self.tail.extend_from_slice(&piece[piece.len() - overlap..]);
        } else {
            self.tail.extend_from_slice(piece);
            let excess = self.tail.len().saturating_sub(overlap);
            self.tail.drain(..excess);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needles() -> Vec<String> {
        ["aaaa", "bbbb", "cccc", "dddd"].map(String::from).to_vec()
    }

    fn streamed(scanner: &Scanner, pieces: &[&[u8]]) -> Vec<u64> {
        let mut found = scanner.found();
        let mut stream = scanner.stream();
        for p in pieces {
            stream.feed(p, &mut found);
        }
        found.indices()
    }

    #[test]
    fn finds_needles_within_and_across_pieces() {
        let s = Scanner::new(&needles()).unwrap();
        assert_eq!(streamed(&s, &[b"..aaaa.."]), [0]);
        // "bbbb" straddles two pieces, "cccc" three (the middle one shorter than a needle).
        assert_eq!(streamed(&s, &[b"xxbb", b"bbxx"]), [1]);
        assert_eq!(streamed(&s, &[b"xc", b"cc", b"cx"]), [2]);
        assert_eq!(streamed(&s, &[b"d", b"d", b"d", b"d"]), [3]);
        assert!(streamed(&s, &[b"aaa", b"xaaa"]).is_empty());
        let mut big = vec![b'x'; 64 * 1024 - 2];
        big.extend_from_slice(b"bb");
        assert_eq!(streamed(&s, &[&big, b"bb", b"..dddd"]), [1, 3]);
    }

    #[test]
    fn two_files_do_not_join_and_targets_are_scanned_whole() {
        let s = Scanner::new(&needles()).unwrap();
        let mut found = s.found();
        s.stream().feed(b"xxaa", &mut found);
        s.stream().feed(b"aaxx", &mut found);
        assert!(found.indices().is_empty());
        s.scan(b"/nix/store/cccc-x", &mut found);
        assert_eq!(found.indices(), [2]);
    }

    #[test]
    fn no_needles_find_nothing() {
        let s = Scanner::new(&[]).unwrap();
        let mut found = s.found();
        s.stream().feed(b"aaaa", &mut found);
        s.scan(b"aaaa", &mut found);
        assert!(found.indices().is_empty());
    }
}
