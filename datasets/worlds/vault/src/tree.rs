//! The seeded virtual file tree: a few directories and text files, one of which holds the
//! 4-digit access code. Everything is derived from the seed through a tiny local PRNG, so a
//! (seed, file count) pair always gives the same tree on every platform and Rust version.

/// Directory names (depth 1).
const DIRS: &[&str] = &[
    "docs", "notes", "logs", "home", "archive", "work", "misc", "backup",
];

/// Ordinary file names: used for decoys, and for the code file when it carries no hint.
const PLAIN_NAMES: &[&str] = &[
    "readme.txt",
    "todo.txt",
    "notes.txt",
    "log.txt",
    "recipe.txt",
    "list.txt",
    "draft.txt",
    "memo.txt",
    "plan.txt",
    "diary.txt",
];

/// Names that give the code file away (used for about half of the seeds).
const HINT_NAMES: &[&str] = &[
    "code.txt",
    "secret.txt",
    "access.txt",
    "vault.txt",
    "pin.txt",
];

/// Decoy contents. None has a digit, so the only 4-digit number in the tree is the code.
const DECOYS: &[&str] = &[
    "Buy milk, eggs and bread.",
    "Meeting moved to Friday afternoon.",
    "Remember to water the plants.",
    "The printer on the second floor is broken.",
    "Call the plumber about the kitchen sink.",
    "Draft: the quarterly report is due soon.",
    "Nothing important here.",
    "Ideas: paint the fence, fix the bike.",
    "The weather was sunny all week.",
    "Pack a charger and a jacket for the trip.",
];

/// How the code is written into its file (`{}` is the code).
const CODE_LINES: &[&str] = &[
    "The access code is {}.",
    "Vault code: {}",
    "Note to self: the code is {}.",
    "Do not share. Access code {}.",
];

/// The most files a tree may have (bounded by the name pools above).
pub const MAX_FILES: usize = 8;

/// splitmix64: a few lines, no dependency, and stable forever (unlike `rand`'s generators,
/// whose streams may change between versions and would silently change the worlds).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`); the modulo bias is irrelevant at these sizes.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// One text file; `path` is relative to the root, without a leading slash (`docs/todo.txt`).
#[derive(Debug, Clone, PartialEq)]
pub struct File {
    /// Path from the root, e.g. `docs/todo.txt` or `memo.txt`.
    pub path: String,
    /// The file's text.
    pub content: String,
}

/// A generated tree with its secret.
#[derive(Debug, Clone, PartialEq)]
pub struct Vault {
    /// Directory paths (all at depth 1, so each is a bare name).
    pub dirs: Vec<String>,
    /// The files, at depth 1 or 2.
    pub files: Vec<File>,
    /// The 4-digit access code.
    pub code: String,
    /// Path (as in [`File::path`]) of the file that holds the code.
    pub code_path: String,
}

/// What a path names in the tree.
enum Node<'a> {
    Dir(&'a str),
    File(&'a File),
}

impl Vault {
    /// Builds the tree for `seed`; `files` fixes the file count (1..=[`MAX_FILES`], clamped),
    /// otherwise the seed picks 2 to 4.
    pub fn generate(seed: u64, files: Option<usize>) -> Vault {
        // Salted so that seed 0 does not start the generator from an all-zero state.
        let mut rng = Rng(seed ^ 0x5641_554C_5421_0001);
        let n_files = files
            .unwrap_or_else(|| 2 + rng.below(3))
            .clamp(1, MAX_FILES);
        let n_dirs = (1 + rng.below(2)).min(n_files);

        let mut dir_names = DIRS.to_vec();
        rng.shuffle(&mut dir_names);
        let dirs: Vec<String> = dir_names[..n_dirs].iter().map(|d| d.to_string()).collect();

        let mut names = PLAIN_NAMES.to_vec();
        rng.shuffle(&mut names);
        let mut decoys = DECOYS.to_vec();
        rng.shuffle(&mut decoys);

        let code_index = rng.below(n_files);
        let code = (1000 + rng.below(9000)).to_string();
        let hinted = rng.below(2) == 0;
        let hint_name = HINT_NAMES[rng.below(HINT_NAMES.len())];
        let code_line = CODE_LINES[rng.below(CODE_LINES.len())].replace("{}", &code);
        // Sometimes the code sits under an ordinary line, so reading the whole file matters.
        let preamble = rng.below(2) == 0;

        let mut out = Vec::with_capacity(n_files);
        let mut code_path = String::new();
        for i in 0..n_files {
            // The first files go one per directory, so no directory is empty; the rest land
            // anywhere (`n_dirs` stands for the root).
            let place = if i < n_dirs { i } else { rng.below(n_dirs + 1) };
            let name = if i == code_index && hinted {
                hint_name
            } else {
                names[i]
            };
            let path = if place < n_dirs {
                format!("{}/{}", dirs[place], name)
            } else {
                name.to_string()
            };
            let content = if i == code_index {
                code_path = path.clone();
                if preamble {
                    format!("{}\n{}", decoys[i], code_line)
                } else {
                    code_line.clone()
                }
            } else {
                decoys[i].to_string()
            };
            out.push(File { path, content });
        }
        Vault {
            dirs,
            files: out,
            code,
            code_path,
        }
    }

    fn lookup(&self, norm: &str) -> Option<Node<'_>> {
        if norm.is_empty() {
            return Some(Node::Dir(""));
        }
        if let Some(d) = self.dirs.iter().find(|d| d.as_str() == norm) {
            return Some(Node::Dir(d));
        }
        self.files.iter().find(|f| f.path == norm).map(Node::File)
    }

    /// `ls`: the entries of a directory, one per line, sorted, directories with a trailing `/`.
    /// The `Ok` value also carries the canonical path (`/docs`) for reward reasons.
    pub fn ls(&self, path: &str) -> Result<(String, String), String> {
        let norm = normalize(path);
        match self.lookup(&norm) {
            Some(Node::Dir(dir)) => {
                let mut entries: Vec<String> = Vec::new();
                if dir.is_empty() {
                    entries.extend(self.dirs.iter().map(|d| format!("{d}/")));
                }
                entries.extend(
                    self.files
                        .iter()
                        .filter(|f| parent(&f.path) == dir)
                        .map(|f| base(&f.path).to_string()),
                );
                entries.sort();
                let listing = if entries.is_empty() {
                    "(empty)".to_string()
                } else {
                    entries.join("\n")
                };
                Ok((format!("/{norm}"), listing))
            }
            Some(Node::File(_)) => Err(format!(
                "ls: {path}: not a directory (use cat to read a file)"
            )),
            None => Err(format!("ls: {path}: no such file or directory")),
        }
    }

    /// `cat`: a file's contents, with its canonical path (`/docs/todo.txt`).
    pub fn cat(&self, path: &str) -> Result<(String, String), String> {
        let norm = normalize(path);
        match self.lookup(&norm) {
            Some(Node::File(f)) => Ok((format!("/{norm}"), f.content.clone())),
            Some(Node::Dir(_)) => Err(format!("cat: {path}: is a directory (use ls to list it)")),
            None => Err(format!("cat: {path}: no such file or directory")),
        }
    }
}

/// Canonical form of a path, relative to the root and without slashes at either end:
/// `/docs/`, `docs`, `./docs` and `/x/../docs` all become `docs`; the root is `""`.
/// `..` never climbs above the root, as in a shell.
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.trim().split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

fn base(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_tree_and_seeds_differ() {
        assert_eq!(Vault::generate(7, None), Vault::generate(7, None));
        let codes: std::collections::BTreeSet<String> =
            (0..32).map(|s| Vault::generate(s, None).code).collect();
        assert!(codes.len() > 20, "codes barely vary: {codes:?}");
    }

    #[test]
    fn trees_are_small_shallow_and_hide_exactly_one_code() {
        let mut hinted = 0;
        for seed in 0..200 {
            let v = Vault::generate(seed, None);
            assert!((2..=4).contains(&v.files.len()), "seed {seed}");
            assert!((1..=2).contains(&v.dirs.len()), "seed {seed}");
            assert_eq!(v.code.len(), 4);
            assert!(v.code.chars().all(|c| c.is_ascii_digit()));
            let holders: Vec<&File> = v
                .files
                .iter()
                .filter(|f| f.content.contains(&v.code))
                .collect();
            assert_eq!(holders.len(), 1, "seed {seed}");
            assert_eq!(holders[0].path, v.code_path);
            for f in &v.files {
                assert!(f.path.split('/').count() <= 2, "too deep: {}", f.path);
                if f.path != v.code_path {
                    assert!(!f.content.chars().any(|c| c.is_ascii_digit()));
                }
            }
            let mut paths: Vec<&str> = v.files.iter().map(|f| f.path.as_str()).collect();
            paths.sort();
            paths.dedup();
            assert_eq!(paths.len(), v.files.len(), "duplicate paths, seed {seed}");
            for d in &v.dirs {
                let (_, listing) = v.ls(d).unwrap();
                assert_ne!(listing, "(empty)", "empty dir, seed {seed}");
            }
            if HINT_NAMES.contains(&base(&v.code_path)) {
                hinted += 1;
            }
        }
        assert!((60..=140).contains(&hinted), "hinted {hinted} of 200");
    }

    #[test]
    fn file_count_option_is_honoured_and_clamped() {
        assert_eq!(Vault::generate(3, Some(1)).files.len(), 1);
        assert_eq!(Vault::generate(3, Some(6)).files.len(), 6);
        assert_eq!(Vault::generate(3, Some(99)).files.len(), MAX_FILES);
        assert_eq!(Vault::generate(3, Some(0)).files.len(), 1);
    }

    #[test]
    fn paths_normalize_like_a_shell() {
        assert_eq!(normalize("/"), "");
        assert_eq!(normalize(""), "");
        assert_eq!(normalize(" ./docs/ "), "docs");
        assert_eq!(normalize("/a/../docs//x.txt"), "docs/x.txt");
        assert_eq!(normalize("../../.."), "");
    }

    #[test]
    fn ls_and_cat_find_everything_and_refuse_the_wrong_kind() {
        let v = Vault::generate(11, Some(5));
        let (canon, root) = v.ls("/").unwrap();
        assert_eq!(canon, "/");
        for d in &v.dirs {
            assert!(root.lines().any(|l| l == format!("{d}/")));
            assert!(v.cat(d).unwrap_err().contains("is a directory"));
        }
        for f in &v.files {
            let (canon, text) = v.cat(&format!("/{}", f.path)).unwrap();
            assert_eq!(canon, format!("/{}", f.path));
            assert_eq!(text, f.content);
            assert!(v.ls(&f.path).unwrap_err().contains("not a directory"));
        }
        assert!(v.ls("/nope").unwrap_err().contains("no such file"));
        assert!(v.cat("nope.txt").unwrap_err().contains("no such file"));
    }
}
