//! The calls about users and their tokens: the token's own user, the account's service users
//! (listed, created), and a user's personal access tokens (listed, created, deleted).

use reqwest::Method;
use secrecy::SecretString;

use super::NetbirdClient;
use crate::netbird::error::{Endpoint, NetbirdError};
use crate::netbird::types::{CreateTokenRequest, CreatedToken, PersonalAccessToken, User};

impl NetbirdClient {
    /// `GET /api/users/current`: the token's user; the cheapest way to verify a token.
    pub async fn current_user(&self, token: &SecretString) -> Result<User, NetbirdError> {
        self.call(
            Endpoint::CurrentUser,
            Method::GET,
            "users/current",
            Some(token),
            None::<&()>,
        )
        .await
    }

    /// `GET /api/users/{id}/tokens` (the server answers `null` for none).
    pub async fn list_tokens(
        &self,
        token: &SecretString,
        user_id: &str,
    ) -> Result<Vec<PersonalAccessToken>, NetbirdError> {
        self.list_tokens_dated(token, user_id)
            .await
            .map(|(list, _)| list)
    }

    /// `GET /api/users/{id}/tokens`, with the server's time of the answer (its `Date` header): a
    /// token's `last_used` is compared with the server's own clock, never the operator's.
    pub async fn list_tokens_dated(
        &self,
        token: &SecretString,
        user_id: &str,
    ) -> Result<(Vec<PersonalAccessToken>, Option<jiff::Timestamp>), NetbirdError> {
        let path = format!("users/{}/tokens", segment(user_id));
        let (list, date): (Option<Vec<PersonalAccessToken>>, _) = self
            .call_dated(
                Endpoint::ListTokens,
                Method::GET,
                &path,
                Some(token),
                None::<&()>,
            )
            .await?;
        Ok((list.unwrap_or_default(), date))
    }

    /// `POST /api/users/{id}/tokens`.
    pub async fn create_token(
        &self,
        token: &SecretString,
        user_id: &str,
        req: &CreateTokenRequest,
    ) -> Result<CreatedToken, NetbirdError> {
        let path = format!("users/{}/tokens", segment(user_id));
        self.call(
            Endpoint::CreateToken,
            Method::POST,
            &path,
            Some(token),
            Some(req),
        )
        .await
    }

    /// `GET /api/users?service_user=true`: the account's service users.
    pub async fn list_service_users(
        &self,
        token: &SecretString,
    ) -> Result<Vec<User>, NetbirdError> {
        let users: Option<Vec<User>> = self
            .call(
                Endpoint::ListUsers,
                Method::GET,
                "users?service_user=true",
                Some(token),
                None::<&()>,
            )
            .await?;
        Ok(users
            .unwrap_or_default()
            .into_iter()
            .filter(|u| u.is_service_user)
            .collect())
    }

    /// `POST /api/users`: a service user with the admin role.
    pub async fn create_service_user(
        &self,
        token: &SecretString,
        name: &str,
    ) -> Result<User, NetbirdError> {
        let body = serde_json::json!({
            "name": name,
            "role": "admin",
            "auto_groups": [],
            "is_service_user": true,
        });
        self.call(
            Endpoint::CreateUser,
            Method::POST,
            "users",
            Some(token),
            Some(&body),
        )
        .await
    }

    /// `DELETE /api/users/{id}/tokens/{tokenId}`.
    pub async fn delete_token(
        &self,
        token: &SecretString,
        user_id: &str,
        token_id: &str,
    ) -> Result<(), NetbirdError> {
        let path = format!("users/{}/tokens/{}", segment(user_id), segment(token_id));
        let _: serde_json::Value = self
            .call(
                Endpoint::DeleteToken,
                Method::DELETE,
                &path,
                Some(token),
                None::<&()>,
            )
            .await?;
        Ok(())
    }
}

/// A path segment with everything but unreserved characters percent-encoded.
fn segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_escaped_in_paths() {
        assert_eq!(segment("a/b?c"), "a%2Fb%3Fc");
    }
}
