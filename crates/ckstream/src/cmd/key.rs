//! `ckstream key`: key pairs for signed and encrypted archives, and the key flags every
//! command shares.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use ckstream_format::{Keyring, WriteKeys};
use ckstream_store::keys::{
    generate_key_pair, load_public_key, load_secret_key, public_key_path, public_keys_in,
    trusted_keys_dir,
};
use ckstream_store::KeyFiles;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a key pair: FILE (the secret key, 0600) and FILE.pub (the public key).
    /// Give FILE.pub to writers (--encrypt-to) and readers (--trusted-key); keep FILE
    /// for --sign and --key.
    Generate {
        /// The secret key file to create (FILE.pub is created beside it).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Print the id of a key file (public or secret), as `ckstream info` names signers.
    Id {
        /// A key file.
        file: PathBuf,
    },
}

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Generate { output } => {
            let public = generate_key_pair(&output)
                .with_context(|| format!("cannot create key pair {}", output.display()))?;
            eprintln!(
                "ckstream: key {} written to {} (secret, keep it) and {} (public)",
                public.id(),
                output.display(),
                public_key_path(&output).display()
            );
            Ok(())
        }
        Command::Id { file } => {
            println!("{}", load_public_key(&file)?.id());
            Ok(())
        }
    }
}

/// Keys for reading archives, accepted by every command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReadKeyArgs {
    /// Secret key file that opens encrypted archives (repeat for several; the
    /// environment variable takes a colon-separated list).
    #[arg(
        long = "key",
        value_name = "KEYFILE",
        global = true,
        env = "CKSTREAM_KEY",
        value_delimiter = ':',
        hide_env_values = true
    )]
    key: Vec<PathBuf>,
    /// Open only archives signed by this key (a .pub file; repeat for several; the
    /// environment variable takes a colon-separated list). The keys in
    /// /etc/ckstream/trusted-keys/*.pub ($CKSTREAM_CONFIG_DIR/trusted-keys) are trusted
    /// too. Podman archives carry no signature and are refused then.
    #[arg(
        long = "trusted-key",
        value_name = "PUBFILE",
        global = true,
        env = "CKSTREAM_TRUSTED_KEYS",
        value_delimiter = ':'
    )]
    trusted_key: Vec<PathBuf>,
}

impl ReadKeyArgs {
    /// The key files given, and the system's trusted keys.
    pub fn files(&self) -> Result<KeyFiles> {
        let mut trusted = self.trusted_key.clone();
        trusted.extend(public_keys_in(&trusted_keys_dir())?);
        Ok(KeyFiles {
            secret: self.key.clone(),
            trusted,
        })
    }
}

/// Keys for writing an archive: on the commands that write one.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WriteKeyArgs {
    /// Sign the archive with this secret key file; readers given its public key with
    /// --trusted-key then refuse any change to it.
    #[arg(long, value_name = "KEYFILE")]
    sign: Option<PathBuf>,
    /// Encrypt the archive (data, metadata and index) to this public key file; repeat
    /// for several recipients. Only their secret keys (--key) open it. Encrypted
    /// archives are never reflinked.
    #[arg(long = "encrypt-to", value_name = "PUBFILE")]
    encrypt_to: Vec<PathBuf>,
}

impl WriteKeyArgs {
    /// Loads the key files.
    pub fn load(&self) -> Result<WriteKeys> {
        Ok(WriteKeys {
            seal_to: self
                .encrypt_to
                .iter()
                .map(|p| load_public_key(p))
                .collect::<Result<_, _>>()?,
            sign_with: self.sign.as_deref().map(load_secret_key).transpose()?,
        })
    }
}

static READ_KEYS: OnceLock<KeyFiles> = OnceLock::new();

/// Records the reader key files of this run (once, before any command runs).
pub fn set_read_keys(args: &ReadKeyArgs) -> Result<()> {
    let _ = READ_KEYS.set(args.files()?);
    Ok(())
}

/// The reader key files of this run.
pub fn read_key_files() -> KeyFiles {
    READ_KEYS.get().cloned().unwrap_or_default()
}

/// The reader keys of this run, loaded.
pub fn read_keys() -> Result<Keyring> {
    Ok(read_key_files().load()?)
}
