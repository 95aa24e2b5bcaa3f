//! `Einsum` (12): rewritten into the IR `einsum` form (explicit output, lower-case letters, no
//! ellipsis).
//!
//! The implicit form (`"ij,jk"`) gets the numpy output: the ellipsis dims, then the letters
//! seen exactly once, alphabetically. An ellipsis becomes fresh letters, right-aligned across
//! operands; an operand's ellipsis dim of size 1 facing a larger one is reshaped away (einsum
//! letters must agree in size). Upper-case letters are renamed to unused lower-case ones.
//! Repeated letters within one operand (diagonals) are rejected.

use crate::graph::ValueId;
use crate::onnx::lower::{bail, LResult, Lowering};
use crate::ops::Einsum;

/// One operand's term: explicit letters before and after an optional ellipsis.
struct Term {
    before: Vec<char>,
    ellipsis: bool,
    after: Vec<char>,
}

fn parse_term(s: &str) -> LResult<Term> {
    let (before, ellipsis, after) = match s.split_once("...") {
        Some((b, a)) => (b, true, a),
        None => (s, false, ""),
    };
    let letters = |p: &str| -> LResult<Vec<char>> {
        p.chars()
            .map(|c| {
                if c.is_ascii_alphabetic() {
                    Ok(c)
                } else {
                    Err(crate::onnx::LowerError::Msg(format!(
                        "bad character {c:?} in equation"
                    )))
                }
            })
            .collect()
    };
    Ok(Term {
        before: letters(before)?,
        ellipsis,
        after: letters(after)?,
    })
}

pub fn einsum(n: &mut Lowering<'_>) -> LResult<Vec<ValueId>> {
    let eq: String = n
        .attr_s("equation", "")?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let xs = n.all_inputs();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let terms = lhs
        .split(',')
        .map(parse_term)
        .collect::<LResult<Vec<_>>>()?;
    if terms.len() != xs.len() {
        bail!(
            "equation {eq:?} has {} operands, the node {}",
            terms.len(),
            xs.len()
        );
    }
    // ellipsis rank of each operand, and the broadcast ellipsis shape
    let mut ell_rank = Vec::with_capacity(xs.len());
    for (t, &x) in terms.iter().zip(&xs) {
        let explicit = t.before.len() + t.after.len();
        let r = n.rank(x);
        if (t.ellipsis && r < explicit) || (!t.ellipsis && r != explicit) {
            bail!(
                "operand {:?} has rank {r}, which its term does not fit",
                n.shape(x)
            );
        }
        ell_rank.push(r - explicit);
    }
    let ne = ell_rank.iter().copied().max().unwrap_or(0);
    let mut ell_shape = vec![1usize; ne];
    for (i, &x) in xs.iter().enumerate() {
        let s = n.shape(x);
        let off = ne - ell_rank[i];
        for j in 0..ell_rank[i] {
            let d = s[terms[i].before.len() + j];
            let e = &mut ell_shape[off + j];
            if *e == 1 {
                *e = d;
            } else if d != 1 && d != *e {
                bail!("ellipsis dims of the operands do not broadcast");
            }
        }
    }
    // letters: keep lower-case ones, rename upper-case ones, fresh ones for the ellipsis
    let used: Vec<char> = eq.chars().filter(|c| c.is_ascii_lowercase()).collect();
    let mut free = ('a'..='z').filter(|c| !used.contains(c));
    let mut rename: Vec<(char, char)> = vec![];
    let mut map = |c: char, free: &mut dyn Iterator<Item = char>| -> LResult<char> {
        if c.is_ascii_lowercase() {
            return Ok(c);
        }
        if let Some(&(_, to)) = rename.iter().find(|(f, _)| *f == c) {
            return Ok(to);
        }
        let Some(to) = free.next() else {
            bail!("equation {eq:?} uses more than 26 letters");
        };
        rename.push((c, to));
        Ok(to)
    };
    let mut ell_letters = vec![];
    for _ in 0..ne {
        match free.next() {
            Some(c) => ell_letters.push(c),
            None => bail!("equation {eq:?} uses more than 26 letters"),
        }
    }
    let mut operands = vec![];
    let mut labels = vec![];
    for (i, (t, &x)) in terms.iter().zip(&xs).enumerate() {
        let s = n.shape(x);
        let mut lab = String::new();
        let mut keep_shape = vec![];
        let mut pos = 0;
        for &c in &t.before {
            lab.push(map(c, &mut free)?);
            keep_shape.push(s[pos]);
            pos += 1;
        }
        let off = ne - ell_rank[i];
        for j in 0..ell_rank[i] {
            let d = s[pos];
            pos += 1;
            if d == ell_shape[off + j] {
                lab.push(ell_letters[off + j]);
                keep_shape.push(d);
            }
        }
        for &c in &t.after {
            lab.push(map(c, &mut free)?);
            keep_shape.push(s[pos]);
            pos += 1;
        }
        if (1..lab.len()).any(|k| lab[k..].contains(&lab[k - 1..k])) {
            bail!("term {lab:?} repeats a letter (diagonals are not supported)");
        }
        operands.push(n.reshape(x, keep_shape)?);
        labels.push(lab);
    }
    let out: String = match rhs {
        Some(r) => {
            let t = parse_term(r)?;
            let mut o = String::new();
            for &c in &t.before {
                o.push(map(c, &mut free)?);
            }
            if t.ellipsis {
                o.extend(ell_letters.iter());
            }
            for &c in &t.after {
                o.push(map(c, &mut free)?);
            }
            o
        }
        None => {
            // numpy: ellipsis dims, then letters seen once in alphabetical order of the
            // original letters
            let mut once: Vec<char> = eq
                .chars()
                .filter(|c| c.is_ascii_alphabetic())
                .filter(|&c| eq.chars().filter(|&d| d == c).count() == 1)
                .collect();
            once.sort_unstable();
            let mut o: String = ell_letters.iter().collect();
            for c in once {
                o.push(map(c, &mut free)?);
            }
            o
        }
    };
    Ok(vec![n.emit(
        Einsum::new(format!("{}->{out}", labels.join(","))),
        &operands,
    )?])
}
