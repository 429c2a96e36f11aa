//! Connect and reconnect: the authorization-code flow with `state` (single use,
//! kept in the store so the callback may land on any process), PKCE, the
//! provider's errors as outcomes, and Intuit's realm checked on a reconnect.
//!
//! ```text
//! begin_connect(id, redirect_uri, options)  -> consent URL (send the user there)
//! finish_connect(raw callback query)        -> Connected { .. } | Denied { .. }
//! ```

use crate::manager::{ManagerError, TokenManager};
use tokenfence_core::connect::{begin, state_key, ConnectEntropy};
use tokenfence_core::{
    Callback, ConnectError, ConnectOptions, ConnectionId, Generation, GrantIdentity,
    PendingAuthorization, SecretString, Timestamp,
};
use tracing::Instrument as _;

/// Where to send the user: the provider's consent page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationUrl {
    /// The consent URL (carries the state and the PKCE challenge; no secret).
    pub url: String,
    /// The connection it is for.
    pub connection: ConnectionId,
    /// The connection existed: this is a reconnect.
    pub reconnect: bool,
    /// The callback is refused after this.
    pub expires_at: Timestamp,
}

/// What a finished authorization came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// The grant is stored.
    Connected {
        /// The connection.
        connection: ConnectionId,
        /// The generation stored.
        generation: Generation,
        /// The realm (Intuit company) the grant is for.
        realm_id: Option<String>,
        /// It replaced an earlier grant of the connection.
        reconnected: bool,
        /// The company changed (the caller allowed it): whether the provider
        /// confirmed the old grant's revocation.
        old_grant_revoked: Option<bool>,
    },
    /// The provider redirected with an error: the user denied access, or the
    /// request was refused. Nothing stored changed.
    Denied {
        /// The connection.
        connection: ConnectionId,
        /// The OAuth error code (`access_denied`, ...).
        error: String,
        /// The provider's description, if any.
        description: Option<String>,
    },
}

impl TokenManager {
    /// Begins connecting (or reconnecting) `id` with the default client: the
    /// consent URL to send the user to, with a fresh `state` and PKCE challenge.
    /// The pending authorization is kept in the store, sealed, for ten minutes.
    pub async fn begin_connect(
        &self,
        id: &ConnectionId,
        redirect_uri: &str,
        options: ConnectOptions,
    ) -> Result<AuthorizationUrl, ManagerError> {
        let client = self.config().identity();
        self.begin_connect_as(&client, id, redirect_uri, options)
            .await
    }

    /// [`begin_connect`](Self::begin_connect) with the registered client `client`.
    pub async fn begin_connect_as(
        &self,
        client: &GrantIdentity,
        id: &ConnectionId,
        redirect_uri: &str,
        options: ConnectOptions,
    ) -> Result<AuthorizationUrl, ManagerError> {
        let config = self.registered(client)?;
        let mut entropy: ConnectEntropy = [0; 64];
        crate::manager::random(&mut entropy, "the state")?;
        let now = self.now();
        let existing = self.store().load(id).await?;
        let begun = begin(
            &config.profile,
            &config.client,
            id,
            redirect_uri,
            &options,
            existing.as_ref(),
            &entropy,
            now,
        )?;
        self.store()
            .put_pending(&state_key(&begun.state), &begun.pending, now)
            .await?;
        Ok(AuthorizationUrl {
            url: begun.url,
            connection: id.clone(),
            reconnect: begun.pending.reconnect,
            expires_at: begun.pending.expires_at,
        })
    }

    /// Finishes an authorization from the raw query string of the provider's
    /// redirect (or the whole callback URL). The state is taken from the store
    /// once: a forged, replayed or expired state is an error and changes nothing;
    /// `error=access_denied` is [`ConnectOutcome::Denied`]; a reconnect that came
    /// back for another company than the connection's is refused before the code
    /// is exchanged (unless begun with `replace_realm`). The code is exchanged
    /// once, with the client that began the flow, and the grant committed by
    /// compare-and-swap like every write.
    pub async fn finish_connect(&self, callback: &str) -> Result<ConnectOutcome, ManagerError> {
        let callback = Callback::parse(callback)?;
        // Shutting down: the state stays unused, for another process to finish.
        if self.is_shutting_down() {
            return Err(ManagerError::ShutDown);
        }
        let pending = self
            .store()
            .take_pending(&state_key(callback.state()))
            .await?
            .ok_or(ConnectError::UnknownState)?;
        let id = pending.connection.clone();
        let (code, realm_id) = match callback {
            Callback::Denied {
                error, description, ..
            } => {
                tracing::info!(connection = %id, %error, "the provider refused the authorization");
                return Ok(ConnectOutcome::Denied {
                    connection: id,
                    error,
                    description,
                });
            }
            Callback::Code { code, realm_id, .. } => (code, realm_id),
        };
        // The state is used up: from here the exchange and the commit run on the
        // manager's own task, so a caller that goes away (a request timeout in
        // the web framework, a browser that disconnects) cannot drop tokens the
        // provider has already issued. The caller waits for the outcome.
        let this = self.clone();
        let finish = async move { this.finish_code(pending, code, realm_id).await };
        self.spawn_task(finish.instrument(tracing::Span::current()))
            .await
            .unwrap_or_else(|_| {
                tracing::error!(connection = %id, "finishing an authorization panicked");
                Err(ManagerError::ActorFailed)
            })
    }

    /// The rest of [`finish_connect`](Self::finish_connect) for a state taken
    /// from the store and its code.
    async fn finish_code(
        &self,
        pending: PendingAuthorization,
        code: SecretString,
        realm_id: Option<String>,
    ) -> Result<ConnectOutcome, ManagerError> {
        let id = pending.connection.clone();
        let stored = self.store().load(&id).await?;
        let realm_changes = pending.check(realm_id.as_deref(), stored.as_ref(), self.now())?;
        let config = self.registered(&pending.identity)?;
        let grant = self
            .exchange_code(
                &config,
                &code,
                &pending.redirect_uri,
                pending.verifier.as_ref(),
            )
            .await?;
        let generation = self
            .connect_as(&pending.identity, &id, grant, realm_id.clone())
            .await?;
        let old_grant_revoked = match (&stored, realm_changes) {
            (Some(old), true) => {
                let old_config = self.registered(&old.identity).unwrap_or(config);
                Some(self.revoke_at_provider(&old_config, &old.refresh).await)
            }
            _ => None,
        };
        tracing::info!(connection = %id, %generation, reconnected = stored.is_some(), "connected");
        Ok(ConnectOutcome::Connected {
            connection: id,
            generation,
            realm_id,
            reconnected: stored.is_some(),
            old_grant_revoked,
        })
    }
}
