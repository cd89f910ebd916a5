def test_fit_then_predict(client, series_id):
    r = client.post(
        f"/fit/{series_id}", json={"timestamps": [1, 2, 3, 4], "values": [1.0, 2.0, 3.0, 4.0]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "v1.0.0"
    r = client.post(f"/predict/{series_id}", json={"timestamp": "5", "value": 100})
    assert r.json() == {"anomaly": True, "model_version": "v1.0.0"}
