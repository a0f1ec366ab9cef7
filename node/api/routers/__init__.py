"""One router per resource: session, studies (with images and feedback), feedback export, notifications."""
