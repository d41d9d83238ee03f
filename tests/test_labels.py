import pytest

from cxrfactory import labels as L


def test_vocabulary_order_is_the_contract():
    assert L.DEFAULT_CLASSES[0] == "Normal"
    assert L.DEFAULT_CLASSES[1:] == ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration",
                                     "Mass", "Nodule", "Pneumonia", "Pneumothorax")
    assert L.class_index("Pneumothorax") == 8


def test_parse_findings_maps_no_finding_to_empty():
    assert L.parse_findings("No Finding") == []
    assert L.parse_findings("Effusion|Mass") == ["Effusion", "Mass"]
    assert L.nih_to_class("No Finding") == "Normal"


def test_validate_classes_orders_and_rejects_unknown():
    assert L.validate_classes(["Mass", "Normal"]) == ("Normal", "Mass")
    with pytest.raises(L.UnknownClassError, match="choose from: Normal, Atelectasis"):
        L.validate_classes(["Hernia"])
    with pytest.raises(ValueError, match="twice"):
        L.validate_classes(["Mass", "Mass"])


def test_multi_hot():
    mh = L.multi_hot([[], ["Effusion", "Mass", "Hernia"]])
    assert mh[0, 0] == 1 and mh[0].sum() == 1
    assert mh[1, L.class_index("Effusion")] == 1 and mh[1, L.class_index("Mass")] == 1
    assert mh[1].sum() == 2  # Hernia is outside the vocabulary
